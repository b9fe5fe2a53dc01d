import sys

from policyflow.cli import main

sys.exit(main())
