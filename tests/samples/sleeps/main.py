# Runs long enough to be cancelled while it runs; its dry run (M2D_DRY_RUN=1)
# passes at once, the way researchers are told to shorten theirs.
import os
import time

print("sleeping", flush=True)
time.sleep(1 if os.environ.get("M2D_DRY_RUN") else 300)
