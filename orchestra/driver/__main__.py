"""`python -m orchestra.driver`: see `orchestra.driver.main`."""

import sys

from orchestra.driver.main import main

if __name__ == "__main__":
    sys.exit(main())
