import sys

from feedback_service.cli import main

sys.exit(main(sys.argv[1:]))
