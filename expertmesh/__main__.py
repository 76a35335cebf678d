"""`python -m expertmesh ...` is the `expertmesh` command."""
import sys

from .cli import main

sys.exit(main())
