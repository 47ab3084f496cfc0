"""A journal writer run as a child process so a test can SIGKILL it mid-write.

``python -m harness.journal_child outbox|inbox PATH RUN`` writes forever and prints one line
per write the journal acknowledged as durable (``ack SEQ BODY`` / ``received KEY`` /
``done KEY REPLY_SEQ``), flushed at once, so the parent knows what must survive the kill.
"""

from __future__ import annotations

import sys
import threading

from journal import Entry, Journal

_print_lock = threading.Lock()


def report(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def outbox_writer(journal: Journal, run: str, thread: int) -> None:
    in_flight = []
    counter = 0
    while True:
        body = f"{run}:{thread}:{counter}"
        counter += 1
        if counter % 4 == 0:  # some blocking appends, most pipelined
            [seq] = journal.append([Entry(address="/q/events", body=body.encode())])
            report(f"ack {seq} {body}")
            continue
        in_flight.append((body, journal.append_async([Entry(address="/q/events",
                                                             body=body.encode())])))
        if len(in_flight) >= 16:
            done_body, handle = in_flight.pop(0)
            report(f"ack {handle.wait()[0]} {done_body}")


def inbox_worker(journal: Journal, run: str) -> None:
    counter = 0
    while True:
        key = f"{run}-{counter}"
        counter += 1
        journal.receive(key, {"operation": "domain.start", "n": counter})
        report(f"received {key}")
        journal.mark_executing(key)
        reply = Entry(address="/q/replies", body=f"reply-to {key}".encode())
        reply_seq = journal.record_result(key, "done", {"ok": True}, reply)
        report(f"done {key} {reply_seq}")
        assert not journal.receive(key, {}).is_new


def main() -> None:
    mode, path, run = sys.argv[1:4]
    journal = Journal(path, "crash-host")
    report("ready")
    if mode == "outbox":
        for thread in range(3):
            threading.Thread(target=outbox_writer, args=(journal, run, thread),
                             daemon=True).start()
        threading.Event().wait()
    else:
        inbox_worker(journal, run)


if __name__ == "__main__":
    main()
