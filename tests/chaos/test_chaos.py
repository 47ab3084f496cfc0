"""The chaos checker classifies honestly, and a short chaos run of every fault loses nothing."""

from __future__ import annotations

from chaos.checker import STEADY, Fault, check
from chaos.run import FAULTS, run

T = 1_800_000_000.0


def test_the_checker_tells_lost_duplicated_unexpected_and_recovered_apart():
    faults = [Fault("partition", T + 10, T + 20)]
    journaled = {"steady-ok": T + 1, "steady-lost": T + 2, "during-recovered": T + 12,
                 "during-live": T + 15, "after": T + 25}
    delivered = [("steady-ok", T + 1.1), ("steady-ok", T + 21),  # a wire duplicate
                 ("during-recovered", T + 20.5),  # sent once the partition healed
                 ("during-live", T + 15.1),  # delivered during the fault (e.g. other host)
                 ("after", T + 25.1), ("forged", T + 26)]
    report = check(journaled, delivered, faults)
    steady, fault = report.windows[STEADY], report.windows["partition"]
    assert (steady.journaled, steady.delivered, steady.lost, steady.duplicated) == (3, 2, 1, 1)
    assert steady.lost_keys == ["steady-lost"]
    assert (fault.journaled, fault.lost, fault.recovered) == (2, 0, 1)
    assert (report.unexpected, report.unexpected_keys) == (1, ["forged"])
    assert not report.ok
    assert "FAILED" in report.table()


def test_a_clean_run_is_ok():
    report = check({"a": T, "b": T + 1}, [("a", T + 0.1), ("b", T + 1.1)], [])
    assert report.ok and report.as_dict()["ok"] is True


def test_a_chaos_run_of_every_fault_loses_nothing(tmp_path):
    report = run(tmp_path, hosts=2, seconds=3.0, faults=FAULTS)
    print(report.table())
    assert report.ok, report.table()
    for name in FAULTS:
        window = report.windows[name]
        assert window.journaled > 0, f"nothing was journaled during {name}"
    partitioned = report.windows["partition-blackhole"]
    assert partitioned.recovered > 0, "the partitioned host's backlog was not carried through"
