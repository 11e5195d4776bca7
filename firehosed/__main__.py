from firehosed.cli import main

raise SystemExit(main())
