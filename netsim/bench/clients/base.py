"""The interface every client runner implements (p2pd, libtorrent, aria2, http)."""

from __future__ import annotations

import subprocess
import threading
import time

from netsim.bench.harness import Ctx, Leecher, Node, RunResult


class Client:
    """A system under test. `run` must leave nothing running when it returns or raises (stop by PID)."""

    name = "?"

    def missing(self) -> str | None:
        """Why this client cannot run here (with the package to install), or None if it can."""
        return None

    def prepare(self, ctx: Ctx) -> None:
        """Once per invocation, untimed (e.g. make the .torrent)."""

    def run(self, ctx: Ctx, run: int) -> RunResult:
        """Set up the swarm, release the leechers, wait for the last, verify, tear down."""
        raise NotImplementedError


class LineLeecher(Leecher):
    """A leecher process that reports readiness and completion on stdout (lt_node: READY, DONE).

    A reader thread stamps each line with the monotonic time it arrived, so completion is timed when reported,
    not when the poll loop gets round to it."""

    def __init__(self, node: Node, output: str, proc: subprocess.Popen, done_word: str = "DONE") -> None:
        super().__init__(node, output)
        self.proc = proc
        self.done_word = done_word
        self.lines: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append((time.monotonic(), line.strip()))
                self._cv.notify_all()
        with self._cv:
            self.lines.append((time.monotonic(), "<EOF>"))
            self._cv.notify_all()

    def expect(self, word: str, timeout: float) -> str:
        """Wait for a line starting with `word`; returns it (raises RuntimeError with what came instead)."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for _, line in self.lines:
                    if line.startswith(word):
                        return line
                    if line == "<EOF>":
                        raise RuntimeError(f"{self.node.name}: exited (rc {self.proc.poll()}) before {word}")
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.node.name}: no {word} within {timeout:.0f} s")
                self._cv.wait(left)

    def send(self, line: str) -> None:
        """A command line to the node (GO / QUIT); a node that already exited is ignored here and caught by poll."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.error = self.error or f"{self.node.name}: exited (rc {self.proc.poll()}) before {line}"

    def go(self) -> None:
        self.send("GO")

    def poll(self, t0_mono: float, t0_wall: float) -> None:
        if self.done_at is not None or self.error is not None:
            return
        with self._cv:
            for t, line in self.lines:
                if line.startswith(self.done_word):
                    self.done_at = t
                    return
                if line == "<EOF>":
                    self.error = f"{self.node.name}: exited (rc {self.proc.poll()}) before {self.done_word}"
                    return
