from localvl.cli import main

raise SystemExit(main())
