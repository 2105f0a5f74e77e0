import sys

from lightrft_mm.cli import main

sys.exit(main())
