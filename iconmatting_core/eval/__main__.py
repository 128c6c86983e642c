"""``python -m iconmatting_core.eval``."""
import sys

from .cli import main

sys.exit(main())
