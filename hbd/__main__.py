from hbd.cli import main

raise SystemExit(main())
