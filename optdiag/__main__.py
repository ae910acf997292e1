import sys

from optdiag.cli import main

sys.exit(main())
