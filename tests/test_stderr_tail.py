"""A failed job's stderr reaches the researcher only as a bounded tail (the
API's error and the failure email): printing is a way out for data."""
from .helpers.stack import SAMPLES, zip_folder

# 10,000 lines of ~60 characters: 600 KB that must not come back
LOUD = """import sys
for i in range(10_000):
    print(f"line {i:05d} " + "x" * 50, file=sys.stderr)
sys.exit(3)
"""


def test_a_job_writing_10000_lines_of_stderr_shows_at_most_20_lines_and_2000_chars(stack, tmp_path):
    researcher = stack.researcher("loud", dry_run=False)  # the real run's tail (a dry run shows it all)
    # the fails sample's requirements: its environment image is usually built already
    submission_id = researcher.submit(zip_folder(SAMPLES / "fails", tmp_path / "loud.zip", extra={"main.py": LOUD}))
    result = researcher.wait_until(submission_id, {"completed", "failed", "build_failed"})
    assert result["status"] == "failed" and result["exit_code"] == 3, result
    tail = result["error"]
    assert "line 09999 " + "x" * 50 in tail  # the end (the relay may add a line after it)
    assert len(tail.splitlines()) <= 20 and len(tail) <= 2000

    mail = researcher.wait_for_mails(submission_id, 4)[-1]
    assert mail["Subject"].endswith("execution failed")
    body = mail.get_content().replace("\r\n", "\n")  # the sink keeps SMTP's line ends
    shown = body.split("The last lines your code wrote to stderr:\n\n", 1)[1].split("\n\nFix the problem", 1)[0]
    assert shown.strip() == tail.strip()
    assert len(shown.splitlines()) <= 20 and len(shown) <= 2000
    assert body.count("line 0") <= 20
