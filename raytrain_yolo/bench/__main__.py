import sys

from raytrain_yolo.bench.cli import main

sys.exit(main())
