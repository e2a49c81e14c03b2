from qlora_kit.cli import main

raise SystemExit(main())
