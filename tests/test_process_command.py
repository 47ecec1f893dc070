"""Pure tests: command splitting, environment, executable lookup, launcher argv, line splitter."""

from __future__ import annotations

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.process.command import (
    CommandError,
    build_env,
    resolve_executable,
    sanitize_command,
)
from llamaswap.process.errors import ProcessError
from llamaswap.process.protocol import TRUNCATED_MARKER, ExitStatus, LineSplitter
from llamaswap.process.spawn import launcher_argv


class SanitizeCommandTests(SynchronousTestCase):
    def test_simple(self) -> None:
        self.assertEqual(sanitize_command("llama-server --port 8080"), ["llama-server", "--port", "8080"])

    def test_quotes(self) -> None:
        self.assertEqual(
            sanitize_command("""sh -c 'echo "a b"; exit 1' "two words" it\\'s"""),
            ["sh", "-c", 'echo "a b"; exit 1', "two words", "it's"],
        )

    def test_no_expansion(self) -> None:
        self.assertEqual(sanitize_command("echo $HOME ~ *.txt ${X}"), ["echo", "$HOME", "~", "*.txt", "${X}"])

    def test_comment_lines_dropped(self) -> None:
        cmd = "# leading comment\nserver\n   # indented comment --bad\n  --port 1 # not a comment line\n"
        self.assertEqual(sanitize_command(cmd), ["server", "--port", "1", "#", "not", "a", "comment", "line"])

    def test_continuation(self) -> None:
        cmd = "server \\\n  --model /m.gguf \\\n  # --disabled \\\n  --ctx 4096\\\n--last"
        self.assertEqual(sanitize_command(cmd), ["server", "--model", "/m.gguf", "--ctx", "4096", "--last"])

    def test_trailing_backslash_with_spaces(self) -> None:
        self.assertEqual(sanitize_command("a \\   \nb"), ["a", "b"])

    def test_crlf(self) -> None:
        self.assertEqual(sanitize_command("a \\\r\n b\r\n c"), ["a", "b", "c"])

    def test_empty(self) -> None:
        for cmd in ("", "   ", "\n\n", "# only a comment\n  # another"):
            with self.assertRaises(CommandError) as caught:
                sanitize_command(cmd)
            self.assertEqual(str(caught.exception), "empty command")

    def test_unbalanced_quote(self) -> None:
        with self.assertRaises(CommandError) as caught:
            sanitize_command("echo 'oops")
        self.assertIn("invalid command", str(caught.exception))
        self.assertIsInstance(caught.exception, ProcessError)


class BuildEnvTests(SynchronousTestCase):
    def test_appended_and_inherited(self) -> None:
        env = build_env({"PATH": "/bin", "HOME": "/h"}, ["CUDA_VISIBLE_DEVICES=0", "A=1"])
        self.assertEqual(env, {"PATH": "/bin", "HOME": "/h", "CUDA_VISIBLE_DEVICES": "0", "A": "1"})

    def test_later_wins(self) -> None:
        env = build_env({"A": "base"}, ["A=1", "B=x", "A=2"])
        self.assertEqual(env["A"], "2")
        self.assertEqual(env["B"], "x")

    def test_value_may_contain_equals_or_be_empty(self) -> None:
        env = build_env({}, ["OPTS=--a=b", "EMPTY="])
        self.assertEqual(env["OPTS"], "--a=b")
        self.assertEqual(env["EMPTY"], "")

    def test_inherits_path_from_os_environ(self) -> None:
        env = build_env(os.environ, ["X=1"])
        self.assertEqual(env["PATH"], os.environ["PATH"])
        self.assertEqual(env["X"], "1")

    def test_never_empty(self) -> None:
        self.assertEqual(build_env({}, []), {"PATH": os.defpath})

    def test_base_not_modified(self) -> None:
        base = {"A": "1"}
        build_env(base, ["A=2"])
        self.assertEqual(base, {"A": "1"})

    def test_invalid_entry(self) -> None:
        for bad in ("NOEQUALS", "=value"):
            self.assertRaises(CommandError, build_env, {}, [bad])


class ResolveExecutableTests(SynchronousTestCase):
    def test_found_in_path(self) -> None:
        here = os.path.dirname(sys.executable)
        name = os.path.basename(sys.executable)
        self.assertEqual(resolve_executable(name, here), os.path.join(here, name))

    def test_absolute(self) -> None:
        self.assertEqual(resolve_executable(sys.executable, ""), sys.executable)

    def test_not_found(self) -> None:
        with self.assertRaises(CommandError) as caught:
            resolve_executable("no-such-binary-llamaswap", os.environ["PATH"])
        self.assertIn("'no-such-binary-llamaswap' not found in PATH", str(caught.exception))

    def test_path_not_executable(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        self.assertRaises(CommandError, resolve_executable, path, "")
        self.assertRaises(CommandError, resolve_executable, "./does/not/exist", "")


class LauncherArgvTests(SynchronousTestCase):
    def test_shape(self) -> None:
        argv = launcher_argv(["/bin/server", "--port", "1"], parent_pid=42)
        self.assertEqual(argv[0], sys.executable)
        self.assertTrue(argv[argv.index("--parent") - 1].endswith(os.path.join("process", "launch.py")))
        self.assertEqual(argv[-6:], ["--parent", "42", "--", "/bin/server", "--port", "1"])


class LineSplitterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lines: list[bytes] = []
        self.splitter = LineSplitter(self.lines.append, max_line=10)

    def test_lines_across_chunks(self) -> None:
        for chunk in (b"ab", b"c\nde", b"f\r\n\ng", b"h"):
            self.splitter.feed(chunk)
        self.assertEqual(self.lines, [b"abc", b"def", b""])
        self.splitter.flush()
        self.assertEqual(self.lines, [b"abc", b"def", b"", b"gh"])

    def test_long_line_in_one_chunk_truncated(self) -> None:
        self.splitter.feed(b"0123456789ABCDEF\nok\n")
        self.assertEqual(self.lines, [b"0123456789" + TRUNCATED_MARKER, b"ok"])

    def test_long_line_across_chunks_truncated_once(self) -> None:
        self.splitter.feed(b"01234")
        self.splitter.feed(b"56789ABC")
        self.assertEqual(self.lines, [b"0123456789" + TRUNCATED_MARKER])
        self.splitter.feed(b"DEFGHIJKLMNOP")
        self.splitter.feed(b"QRS\nnext\n")
        self.assertEqual(self.lines, [b"0123456789" + TRUNCATED_MARKER, b"next"])

    def test_exactly_max(self) -> None:
        self.splitter.feed(b"0123456789\n")
        self.assertEqual(self.lines, [b"0123456789"])


class ExitStatusTests(SynchronousTestCase):
    def test_str(self) -> None:
        self.assertEqual(str(ExitStatus(3)), "exit code 3")
        self.assertEqual(str(ExitStatus(None, 9)), "killed by signal 9 (SIGKILL)")
        self.assertEqual(str(ExitStatus(None)), "unknown exit status")
