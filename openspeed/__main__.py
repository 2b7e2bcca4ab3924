from openspeed.cli import main

raise SystemExit(main())
