"""Re-encode videos: python scripts/prepare_videos.py SRC DST (= neighborretr-prepare-videos)."""

import sys

from neighborretr_train.prepare_videos import main

if __name__ == "__main__":
    sys.exit(main())
