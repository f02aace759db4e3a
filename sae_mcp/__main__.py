from sae_mcp.cli import main

raise SystemExit(main())
