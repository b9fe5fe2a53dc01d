import sys

from policyflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
