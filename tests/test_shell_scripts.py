"""The deploy scripts' here-documents: in an unquoted one (``<<EOF``) a
backquote is a command the script runs, not text. A comment in slurm.conf's
(`scontrol reconfigure`) ran scontrol each time up.sh wrote it: a reconfigure
of the running cluster, and on a fresh machine a minute of scontrol waiting
for the slurm.conf it was being written into."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def backquotes_in_unquoted_heredocs(text):
    """[(line number, line)] of the backquotes inside unquoted here-documents."""
    found, end = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if end is not None:
            if line.strip() == end:
                end = None
            elif "`" in line:
                found.append((number, line))
            continue
        opened = HEREDOC.search(line)
        if opened and not opened.group(1):
            end = opened.group(2)
    return found


def test_the_check_finds_a_backquote_only_where_the_shell_runs_it():
    script = "cat <<EOF\nruns `this`\nEOF\ncat <<'EOF'\nkept `as text`\nEOF\n# a `comment`\n"
    assert backquotes_in_unquoted_heredocs(script) == [(2, "runs `this`")]


def test_no_deploy_script_runs_a_command_from_a_heredoc_by_accident():
    scripts = sorted((REPO / "deploy").rglob("*.sh"))
    assert scripts
    found = {str(s.relative_to(REPO)): hits for s in scripts if (hits := backquotes_in_unquoted_heredocs(s.read_text()))}
    assert not found, found
