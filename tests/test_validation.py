import os
import re
import stat
import subprocess
import sys
import zipfile

import pytest

from m2d.contract.validation import Checked, Refusal, UploadLimits, check_upload_size, check_zip, normalise_requirements, unpack
from tests.helpers import zips


def refusal(path, limits=UploadLimits()) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check_zip(path, limits)
    return caught.value


# --- accepted ------------------------------------------------------------------


def test_zip_with_main_and_requirements_at_root_is_accepted(tmp_path):
    checked = check_zip(zips.make_valid_zip(tmp_path / "s.zip"))
    assert checked == Checked(
        files=2,
        uncompressed_bytes=len(zips.MAIN_PY) + len(zips.REQUIREMENTS),
        requirements=zips.REQUIREMENTS.decode(),
    )


def test_extra_folders_and_files_are_accepted(tmp_path):
    checked = check_zip(zips.make_zip_with_folders(tmp_path / "s.zip"))
    assert checked.files == 7


def test_macos_junk_folder_is_not_a_second_top_folder(tmp_path):
    assert check_zip(zips.make_macos_zip(tmp_path / "s.zip")).files == 4


def test_requirements_may_be_empty_and_start_with_a_byte_order_mark(tmp_path):
    assert check_zip(zips.make_requirements_zip(tmp_path / "s.zip", b"")).requirements == ""
    bom = zips.make_requirements_zip(tmp_path / "bom.zip", "\ufeffnumpy\n".encode())
    assert check_zip(bom).requirements == "numpy\n"


@pytest.mark.parametrize("line", [
    "numpy==2.3.4",
    "requests[socks] >= 2.0 ; python_version >= '3.8'",
    "torch --hash=sha256:0123abcd",
    "mypkg @ https://example.org/packages/mypkg-1.0-py3-none-any.whl",
    "mypkg @ git+https://github.com/example/mypkg@v1.0#egg=mypkg",
    "--pre",
    "--only-binary :all:",
    "--prefer-binary",
])
def test_ordinary_requirements_are_accepted(tmp_path, line):
    check_zip(zips.make_requirements_zip(tmp_path / "s.zip", f"{line}\n"))


def test_a_small_file_that_compresses_very_well_is_accepted(tmp_path):
    check_zip(zips.make_zip(tmp_path / "s.zip", zips.VALID_FILES | {"zeros.bin": bytes(512 * 1024)}))


# --- refused -------------------------------------------------------------------


@pytest.mark.parametrize("make, says", [
    (zips.make_text_file, "not a zip"),
    (zips.make_empty_file, "empty (0 bytes)"),
    (zips.make_tar_renamed_zip, "tar archive"),
    (zips.make_truncated_zip, "cut short"),
])
def test_a_file_that_is_not_a_zip_is_refused_saying_what_it_is(tmp_path, make, says):
    error = refusal(make(tmp_path / "s.zip"))
    assert error.code == "not_a_zip"
    assert says in error.message


def test_upload_over_the_size_limit_is_refused():
    check_upload_size(200 * 1024**2)
    with pytest.raises(Refusal) as caught:
        check_upload_size(200 * 1024**2 + 1)
    assert caught.value.code == "too_large"
    assert "200.0 MiB" in caught.value.message


def test_oversized_zip_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "s.zip"
    with open(path, "wb") as f:
        f.truncate(200 * 1024**2 + 1)  # sparse: costs no disk, and is not a zip
    assert refusal(path).code == "too_large"


def test_padded_zip_over_a_configured_limit_is_too_large(tmp_path):
    path = zips.make_padded_zip(tmp_path / "s.zip", 2 * 1024**2)
    assert refusal(path, UploadLimits(max_zip_bytes=1024**2)).code == "too_large"


def test_too_many_files_is_refused(tmp_path):
    error = refusal(zips.make_many_files_zip(tmp_path / "s.zip"))
    assert error.code == "too_many_files"
    assert "limit is 2000" in error.message


@pytest.mark.parametrize("name", ["/etc/cron.d/m2d", "\\Windows\\evil.py", "C:/evil.py", "C:\\evil.py"])
def test_absolute_paths_are_refused(tmp_path, name):
    assert refusal(zips.make_absolute_path_zip(tmp_path / "s.zip", name)).code == "absolute_path"


@pytest.mark.parametrize("name", ["../outside.py", "src/../../outside.py", "..\\outside.py", "src\\..\\..\\x.py", "a/.."])
def test_paths_that_climb_out_with_dot_dot_are_refused(tmp_path, name):
    assert refusal(zips.make_parent_path_zip(tmp_path / "s.zip", name)).code == "parent_path"


def test_symlinks_are_refused(tmp_path):
    error = refusal(zips.make_symlink_zip(tmp_path / "s.zip"))
    assert error.code == "symlink"
    assert "'dataset'" in error.message


def test_encrypted_entries_are_refused(tmp_path):
    path = zips.make_encrypted_zip(tmp_path / "s.zip")
    with zipfile.ZipFile(path) as archive:  # the hand-set flag is what any reader sees
        assert archive.getinfo("main.py").flag_bits & 0x1
        with pytest.raises(RuntimeError, match="password required"):
            archive.read("main.py")
    error = refusal(path)
    assert error.code == "encrypted"
    assert "without a password" in error.message


def test_compression_methods_zipfile_cannot_read_are_refused(tmp_path):
    assert refusal(zips.make_unsupported_compression_zip(tmp_path / "s.zip")).code == "unsupported_compression"


def test_the_same_path_twice_is_refused(tmp_path):
    assert refusal(zips.make_duplicate_zip(tmp_path / "s.zip")).code == "duplicate_path"
    same_place = zips.make_zip(tmp_path / "dots.zip", zips.VALID_FILES | {"./main.py": b""})
    assert refusal(same_place).code == "duplicate_path"


def test_a_path_that_is_both_file_and_folder_is_refused(tmp_path):
    path = zips.make_zip(tmp_path / "s.zip", zips.VALID_FILES | {"lib": b"", "lib/x.py": b""})
    assert refusal(path).code == "duplicate_path"


def test_declared_uncompressed_size_over_the_limit_is_refused_without_decompressing(tmp_path):
    error = refusal(zips.make_huge_declared_zip(tmp_path / "s.zip"))
    assert error.code == "too_big_uncompressed"
    assert "3072.0 MiB" in error.message


def test_zip_bomb_is_refused_by_compression_ratio(tmp_path):
    error = refusal(zips.make_zip_bomb(tmp_path / "s.zip"))
    assert error.code == "compression_ratio"


def test_one_bomb_hidden_among_incompressible_data_is_refused(tmp_path):
    noise = os.urandom(2 * 1024**2)
    bomb = zips.make_zip(tmp_path / "s.zip", zips.VALID_FILES | {"noise.bin": noise, "bomb.bin": bytes(4 * 1024**2)})
    # On average the archive compresses only 3:1; bomb.bin alone 1000:1.
    error = refusal(bomb)
    assert error.code == "compression_ratio"
    assert "'bomb.bin'" in error.message


def test_many_small_bombs_are_refused_by_the_whole_archive_ratio(tmp_path):
    files = zips.VALID_FILES | {f"zeros/{i}.bin": bytes(512 * 1024) for i in range(8)}
    error = refusal(zips.make_zip(tmp_path / "s.zip", files))
    assert error.code == "compression_ratio"
    assert "Your zip as a whole" in error.message


def test_zip_without_main_py_is_refused(tmp_path):
    error = refusal(zips.make_zip_without(tmp_path / "s.zip", "main.py"))
    assert error.code == "missing_main"
    assert "python main.py" in error.message


def test_empty_zip_is_refused_as_missing_main(tmp_path):
    error = refusal(zips.make_empty_zip(tmp_path / "s.zip"))
    assert (error.code, error.message) == ("missing_main", "Your zip is empty. Put main.py and requirements.txt at its root.")


def test_zip_without_requirements_txt_is_refused(tmp_path):
    error = refusal(zips.make_zip_without(tmp_path / "s.zip", "requirements.txt"))
    assert error.code == "missing_requirements"
    assert "may be empty" in error.message


def test_files_inside_one_top_folder_are_refused_naming_the_folder_and_the_fix(tmp_path):
    error = refusal(zips.make_nested_zip(tmp_path / "s.zip", "project"))
    assert error.code == "nested_folder"
    assert str(error) == error.message == (
        "main.py and requirements.txt are inside the folder 'project/' in your zip; zip the files "
        "themselves so they sit at the root: cd project && zip -r ../submission.zip ."
    )


def test_files_two_folders_down_get_a_fix_that_climbs_two_levels(tmp_path):
    path = zips.make_zip(tmp_path / "s.zip", {f"a/b/{n}": c for n, c in zips.VALID_FILES.items()})
    assert refusal(path).message.endswith("cd a/b && zip -r ../../submission.zip .")


@pytest.mark.parametrize("line, why", [
    ("-e .", "editable installs"),
    ("--editable=git+https://github.com/x/y#egg=y", "editable installs"),
    ("-r other.txt", "includes another file"),
    ("-rother.txt", "includes another file"),
    ("--requirement other.txt", "includes another file"),
    ("-c constraints.txt", "includes another file"),
    ("--constraint=constraints.txt", "includes another file"),
    ("--index-url https://evil.example/simple", "PyPI only"),
    ("-i https://evil.example/simple", "PyPI only"),
    ("--extra-index-url=https://evil.example/simple", "dependency confusion"),
    ("--extra-index https://evil.example/simple", "PyPI only"),
    ("--find-links /srv/wheels", "PyPI only"),
    ("-f https://evil.example/wheels/", "PyPI only"),
    ("--trusted-host evil.example", "PyPI only"),
    ("./mypkg", "local path"),
    ("../mypkg", "local path"),
    (".", "local path"),
    ("/opt/wheels/mypkg-1.0-py3-none-any.whl", "local path"),
    ("mypkg-1.0-py3-none-any.whl", "local path"),
    ("src/mypkg", "local path"),
    ("~/mypkg", "local path"),
    ("mypkg @ file:///home/me/mypkg", "local path"),
    ("file:../mypkg#egg=mypkg", "local path"),
    ("mypkg@file:///home/me/mypkg-1.0-py3-none-any.whl", "local path"),
    ("mypkg @ git+file:///srv/repo.git", "local path"),
    ("mypkg@FILE:///etc/passwd", "local path"),
    ("numpy --index-url https://evil.example/simple", "PyPI only"),
    ("--index-url \\\n    https://evil.example/simple", "PyPI only"),
    ("mypkg @ https://example.org/${SECRET_TOKEN}/mypkg.whl", "environment"),
])
def test_requirements_that_reach_outside_the_build_are_refused_saying_why(tmp_path, line, why):
    path = zips.make_requirements_zip(tmp_path / "s.zip", f"numpy==2.3.4\n{line}  # mine\n")
    error = refusal(path)
    assert error.code == "bad_requirements"
    assert "line 2" in error.message
    assert why in error.message


def test_every_bad_requirements_line_is_named(tmp_path):
    path = zips.make_requirements_zip(tmp_path / "s.zip", "-e .\nnumpy\n-r more.txt\n")
    message = refusal(path).message
    assert "line 1, '-e .'" in message and "line 3, '-r more.txt'" in message


def test_commented_out_options_are_fine(tmp_path):
    check_zip(zips.make_requirements_zip(tmp_path / "s.zip", "# -e .\nnumpy  # --index-url x\n"))


@pytest.mark.parametrize("content, says", [
    ("numpy==2.0\n".encode("utf-16"), "not a text file"),
    ("scikit-learn  # für Daten\n".encode("latin-1"), "not UTF-8"),
    (b"numpy\n" * 20000, "limit is 65536"),
])
def test_requirements_that_are_not_small_utf8_text_are_refused(tmp_path, content, says):
    error = refusal(zips.make_requirements_zip(tmp_path / "s.zip", content))
    assert error.code == "bad_requirements"
    assert says in error.message


def test_every_refusal_says_how_to_fix_it(tmp_path):
    # A message that only says what is wrong leaves the researcher guessing.
    makers = [zips.make_text_file, zips.make_many_files_zip, zips.make_absolute_path_zip, zips.make_parent_path_zip,
              zips.make_symlink_zip, zips.make_encrypted_zip, zips.make_unsupported_compression_zip,
              zips.make_duplicate_zip, zips.make_huge_declared_zip, zips.make_zip_bomb, zips.make_nested_zip]
    fixes = ("Make", "Leave", "Zip", "zip", "Re-create", "put", "cd ")
    for make in makers:
        message = refusal(make(tmp_path / f"{make.__name__}.zip")).message
        # after the clause that says what is wrong, one that starts with what to do
        what_is_wrong, *rest = re.split(r"[.;:]\s+", message)
        assert rest and any(clause.startswith(fixes) for clause in rest), message


# --- normalise_requirements ------------------------------------------------------


def test_requirements_that_differ_only_in_comments_blanks_and_line_endings_normalise_equal():
    plain = "numpy==2.3.4\nrequests\n"
    messy = "\ufeff# my deps\r\n\r\nnumpy==2.3.4   # pinned\r\n  requests \t\r\n\n# end"
    assert normalise_requirements(messy) == normalise_requirements(plain) == plain


def test_normalising_keeps_order_and_urls_with_fragments():
    text = "requests\nnumpy\nmypkg @ git+https://github.com/x/y#egg=mypkg\n"
    assert normalise_requirements(text) == text
    assert normalise_requirements("numpy\nrequests\n") != normalise_requirements("requests\nnumpy\n")


def test_different_versions_normalise_differently():
    assert normalise_requirements("numpy==2.3.4") != normalise_requirements("numpy==2.3.5")


def test_requirements_with_nothing_in_them_normalise_to_the_empty_string():
    assert normalise_requirements("# nothing\n\n   \n") == ""


# --- unpack ----------------------------------------------------------------------


def test_unpack_writes_regular_files_with_only_the_executable_bit_from_the_zip(tmp_path):
    path = zips.make_zip(tmp_path / "s.zip", {**zips.VALID_FILES, "bin/run.sh": b"#!/bin/sh\n", "setuid": b""},
                         modes={"bin/run.sh": 0o777, "setuid": 0o4666})
    unpack(path, tmp_path / "code")
    code = tmp_path / "code"
    assert (code / "main.py").read_bytes() == zips.MAIN_PY
    assert stat.S_IMODE((code / "main.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((code / "bin/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((code / "setuid").stat().st_mode) == 0o644


def test_unpack_creates_folders_and_leaves_macos_junk_out(tmp_path):
    unpack(zips.make_zip_with_folders(tmp_path / "a.zip"), tmp_path / "a")
    assert (tmp_path / "a/src/utils/helpers.py").is_file()
    unpack(zips.make_macos_zip(tmp_path / "b.zip"), tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["main.py", "requirements.txt"]


def test_unpack_into_an_existing_empty_folder_works_but_not_into_a_full_one(tmp_path):
    (tmp_path / "empty").mkdir()
    unpack(zips.make_valid_zip(tmp_path / "s.zip"), tmp_path / "empty")
    with pytest.raises(FileExistsError):
        unpack(tmp_path / "s.zip", tmp_path / "empty")


@pytest.mark.parametrize("make, code", [
    (zips.make_parent_path_zip, "parent_path"),
    (zips.make_absolute_path_zip, "absolute_path"),
    (zips.make_symlink_zip, "symlink"),
])
def test_unpack_checks_each_path_again_and_writes_nothing_outside(tmp_path, make, code):
    path = make(tmp_path / "unchecked.zip")
    with pytest.raises(Refusal) as caught:
        unpack(path, tmp_path / "deep/code")
    assert caught.value.code == code
    assert sorted(os.listdir(tmp_path)) == ["deep", "unchecked.zip"]


def test_backslash_separated_names_unpack_into_folders(tmp_path):
    unpack(zips.make_zip(tmp_path / "s.zip", {**zips.VALID_FILES, "src\\model.py": b"x = 1\n"}), tmp_path / "c")
    assert (tmp_path / "c/src/model.py").read_text() == "x = 1\n"


def test_validation_imports_with_the_standard_library_alone():
    # The m2d client uses this module; it must not drag in the server's dependencies.
    script = (
        "import sys, m2d.contract.validation, m2d.contract.states, m2d.contract.twin\n"
        "third_party = {'flask', 'sqlalchemy', 'requests', 'redis', 'rq'} & set(sys.modules)\n"
        "assert not third_party, third_party\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# --- .python-version -------------------------------------------------------------


@pytest.mark.parametrize("text, python", [("3.9\n", "3.9"), ("3.9.18", "3.9"), ("# pinned\n\n3.13\n", "3.13"),
                                          ("cpython-3.11.4", "3.11"), ("python3.9", "3.9"), ("3.9\n3.11\n", "3.9")])
def test_python_version_file_picks_the_python(tmp_path, text, python):
    path = zips.make_zip(tmp_path / "s.zip", {**zips.VALID_FILES, ".python-version": text})
    assert check_zip(path).python == python


def test_without_python_version_the_default_python(tmp_path):
    assert check_zip(zips.make_valid_zip(tmp_path / "s.zip")).python == "3.11"
    assert check_zip(zips.make_valid_zip(tmp_path / "s.zip"), UploadLimits(default_python="3.13")).python == "3.13"


def test_unsupported_python_is_refused_with_the_supported_list(tmp_path):
    path = zips.make_zip(tmp_path / "s.zip", {**zips.VALID_FILES, ".python-version": "3.8.10\n"})
    refused = refusal(path)
    assert refused.code == "unsupported_python"
    assert "Python 3.8" in refused.message and "Supported versions: 3.9, 3.11, 3.13" in refused.message
    assert check_zip(path, UploadLimits(pythons=("3.8", "3.11"))).python == "3.8"  # the supported set is a setting


@pytest.mark.parametrize("text", ["", "# nothing\n", "pypy3.9", "system", "3"])
def test_unreadable_python_version_is_refused(tmp_path, text):
    path = zips.make_zip(tmp_path / "s.zip", {**zips.VALID_FILES, ".python-version": text})
    refused = refusal(path)
    assert refused.code == "bad_python_version" and "3.11" in refused.message
