from carbseg.cli import main

raise SystemExit(main())
