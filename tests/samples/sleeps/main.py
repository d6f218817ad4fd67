# Runs long enough to be cancelled while it runs.
import time

print("sleeping", flush=True)
time.sleep(300)
