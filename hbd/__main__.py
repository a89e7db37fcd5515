from hbd.entry import main

raise SystemExit(main())
