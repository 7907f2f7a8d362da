from cargohold.cli.main import main

raise SystemExit(main())
