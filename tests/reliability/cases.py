"""The fault cases of issue 7, each with the known end it must reach and the tests that show it.

A case lists tests of other files by node id (a parametrized test counts with all its
parameters); tests/test_reliability.py marks its own with ``@pytest.mark.reliability("case")``.
Listing a test here instead of marking it keeps each area's test file its own, and lets
``pytest tests/test_reliability.py`` run the whole matrix (the plugin adds these node ids).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Case:
    group: str
    name: str
    end: str  # the known end every test of the case asserts, in a few words
    tests: tuple[str, ...] = ()  # node ids in other test files


A = "tests/test_applier.py::"
D = "tests/test_daemon.py::"
CP = "tests/test_control_protocol.py::"
CS = "tests/test_control_server.py::"
CC = "tests/test_control_client.py::"
S = "tests/test_state.py::"

CASES: tuple[Case, ...] = (
    # --- nixos-rebuild ---------------------------------------------------------------------------
    Case(
        "nixos-rebuild",
        "nixos-rebuild fails",
        "previous set runs (a failed build touched nothing; a failed activation is rolled back); "
        "state: previous set, module `failed`; one line with the log path; journal APPLY_FAILED "
        "with the phase (and APPLY_ROLLED_BACK after an activation)",
        (
            A + "test_failure_rolls_back_to_the_previous_system",
            A + "test_a_broken_flake_fails_in_nix_and_rolls_back",
            A + "test_journal_entries_of_one_apply",
            D + "test_failing_apply_backs_off_then_succeeds",
        ),
    ),
    Case(
        "nixos-rebuild",
        "nixos-rebuild hangs past the timeout",
        "the build's process group killed (children too); previous set untouched; result "
        "`timed-out`",
        (A + "test_timeout_kills_the_build_and_touches_nothing",),
    ),
    Case(
        "nixos-rebuild",
        "nixos-rebuild is SIGKILLed",
        "previous set; one line naming SIGKILL; rolled back when it was the activation",
        (A + "test_a_sigkilled_phase_fails_and_only_activation_rolls_back",),
    ),
    Case(
        "nixos-rebuild",
        "nixos-rebuild prints 10 MB of output",
        "caller sees every line; log keeps head and tail (< 5.1 MiB); journal capped at 10,000 "
        "lines plus where the log is; the message is the last meaningful line",
        (
            A + "test_ten_megabytes_of_output_are_capped",
            A + "test_output_to_the_journal_is_capped",
        ),
    ),
    Case(
        "nixos-rebuild",
        "the rollback fails too",
        "result `rollback-failed`, state marked uncertain, the line says to run "
        "`runtime-modules rebuild`; the next apply rebuilds",
        (A + "test_rollback_failure_is_reported_and_forces_the_next_apply",),
    ),
    Case(
        "nixos-rebuild",
        "SIGTERM to the daemon during an apply",
        "the apply finishes within the stop timeout, or its build is cancelled (an activation "
        "is never cancelled: it finishes); no follow-up apply; state true",
        (
            D + "test_sigterm_during_an_apply_cancels_and_rolls_back",
            D + "test_sigterm_lets_a_short_apply_finish",
            A + "test_cancel_stops_the_build_and_touches_nothing",
            A + "test_cancel_during_activation_waits_for_it_and_ends_normally",
        ),
    ),
    # --- killed processes ------------------------------------------------------------------------
    Case(
        "killed processes",
        "daemon SIGKILLed at a random point of an apply, then restarted (20 seeded runs)",
        "after the restart: the orphaned rebuild killed and, if the kill was mid-apply, rolled "
        "back (journal APPLY_ROLLED_BACK, one line: the apply was interrupted); then the wanted "
        "set applied; no two rebuilds ever at once; state true (applied = running system, "
        "nothing in progress)",
    ),
    Case(
        "killed processes",
        "an applier killed while its rebuild runs",
        "the orphaned rebuild keeps the lock until recovery kills its group; rolled back; the "
        "next apply works",
        (
            A + "test_recover_after_the_applier_was_killed",
            A + "test_a_waiting_apply_outlives_a_holder_that_dies",
            A + "test_an_apply_finds_an_interrupted_one_and_rolls_it_back_first",
        ),
    ),
    Case(
        "killed processes",
        "daemon restarted with everything present",
        "no apply at all",
        (D + "test_restart_with_everything_present_applies_nothing",),
    ),
    # --- the state directory ---------------------------------------------------------------------
    Case(
        "state directory",
        "state dir read-only when state is written",
        "nothing runs; old state file unchanged; one line naming the state dir and the "
        "read-only file system; journal STATE_WRITE_FAILED; the daemon retries after its "
        "backoff and succeeds once writable",
        (
            A + "test_read_only_state_dir_stops_before_anything_runs",
            S + "test_read_only_state_dir_gives_a_clear_error_and_keeps_the_state",
            S + "test_recovery_on_a_read_only_dir_only_warns",
            "tests/test_cli_modules.py::test_read_only_state_dir",
        ),
    ),
    Case(
        "state directory",
        "state dir full (small tmpfs) when state is written",
        "nothing runs; full during the build, nothing is activated; full during the "
        "activation, it is rolled back so the system matches the file that stays; one line "
        "`… is full; free some space`; journal STATE_WRITE_FAILED",
        (
            A + "test_full_state_dir_stops_before_anything_runs",
            S + "test_full_state_dir_gives_a_clear_error_and_keeps_the_state",
            "tests/test_overrides.py::test_full_disk_leaves_the_previous_file",
        ),
    ),
    # --- bad files -------------------------------------------------------------------------------
    Case(
        "bad files",
        "state file truncated, empty, binary or huge",
        "one warning naming the file; set aside as state.json.corrupt; empty state marked "
        "uncertain; the daemon rebuilds the wanted set",
        (S + "test_bad_state_file_warns_and_recovers",),
    ),
    Case(
        "bad files",
        "override file truncated, empty, binary or huge",
        "one warning naming the file and the copy set aside; its overrides ignored, the other "
        "layer kept; huge files not read whole",
        (
            "tests/test_overrides.py::test_bad_runtime_file_is_set_aside_with_a_warning",
            "tests/test_overrides.py::test_huge_file_is_not_read_whole",
            "tests/test_overrides.py::test_unreadable_file_warns_and_does_not_crash",
        ),
    ),
    Case(
        "bad files",
        "registry truncated, empty, binary or huge",
        "one line naming the file (exit code 2); the daemon does not start, or on SIGHUP keeps "
        "the last good registry and rules",
        ("tests/test_registry.py::test_bad_registry_names_file_and_field",),
    ),
    Case(
        "bad files",
        "rule file truncated, empty, binary or huge",
        "every problem named with file, rule and field; on SIGHUP the loaded rules stay and the "
        "journal has RULES_REJECTED",
        (
            "tests/test_rules.py::test_huge_and_deep_files",
            D + "test_broken_rules_on_sighup_keep_the_old_ones_and_say_why",
        ),
    ),
    # --- journald, udev, netlink -----------------------------------------------------------------
    Case(
        "sources and journal",
        "journald absent",
        "every journal line goes to stderr, one line each, fields included",
        ("tests/test_journal.py::test_without_journald_the_line_goes_to_stderr",),
    ),
    Case(
        "sources and journal",
        "udev monitor errors and overrun",
        "re-enumeration (WORLD_RESYNCED); the world equals a fresh enumeration; the right set "
        "applied once",
        ("tests/test_udev_source.py::test_monitor_overrun_is_answered_by_re_enumeration",),
    ),
    Case(
        "sources and journal",
        "netlink overrun",
        "re-enumeration; the right set applied once",
        (
            D + "test_netlink_overrun_is_recovered_by_re_enumeration",
            "tests/test_netlink_source.py::test_overrun_is_answered_by_a_fresh_dump",
        ),
    ),
    # --- fuzzing ---------------------------------------------------------------------------------
    Case(
        "fuzzing",
        "rule files (hypothesis)",
        "rules or a located RuleError, never another exception",
        (
            "tests/test_rules.py::test_any_json_gives_rules_or_a_located_error",
            "tests/test_rules.py::test_any_toml_gives_rules_or_a_located_error",
            "tests/test_rules.py::test_any_condition_gives_rules_or_a_located_error",
            "tests/test_rules.py::test_any_bytes_give_rules_or_a_located_error",
            "tests/test_replay.py::test_any_capture_text_parses_or_is_a_dump_error",
        ),
    ),
    Case(
        "fuzzing",
        "udev property values and interface names (quotes, ${…}, newlines, non-UTF-8, 64 KiB)",
        "no crash through sources, evaluation, reconciler, journal and a dry-run apply; "
        "flake.nix bytes constant; enabled.json holds registry names only",
        (
            "tests/test_dumps.py::test_non_utf8_values_survive",
            "tests/test_flake.py::test_hostile_names_reach_nix_as_data_only",
            "tests/test_flake.py::test_hostile_descriptions_do_not_change_the_flake",
            "tests/test_journal.py::test_multiline_and_binary_ish_values_survive",
        ),
    ),
    Case(
        "fuzzing",
        "rule files and device values (atheris, coverage-guided)",
        "no exception but RuleError; flake.nix bytes constant",
    ),
    # --- the control socket ----------------------------------------------------------------------
    Case(
        "control socket",
        "malformed messages",
        "an `error` answer with a code, then close; the parser never raises",
        (
            CS + "test_bad_requests_get_an_error_and_a_close",
            CP + "test_request_parser_never_raises",
            CS + "test_handler_errors_become_answers",
            CC + "test_client_skips_answers_it_does_not_know",
        ),
    ),
    Case(
        "control socket",
        "oversized messages",
        "refused at 64 KiB without reading the rest",
        (CS + "test_oversized_line_is_refused",),
    ),
    Case(
        "control socket",
        "slow clients",
        "a silent client times out, a subscriber that never reads is dropped; others are "
        "served meanwhile",
        (
            CS + "test_silent_client_times_out_without_blocking_others",
            CS + "test_subscriber_that_never_reads_is_dropped",
            CS + "test_half_closed_client_still_gets_its_answer",
            CC + "test_hung_daemon_times_out",
        ),
    ),
    Case(
        "control socket",
        "many clients at once",
        "fifty served; past the limit a `busy` answer; out of descriptors it pauses accepting "
        "instead of spinning",
        (
            CS + "test_fifty_clients_at_once",
            CS + "test_too_many_clients_get_a_busy_answer",
            CS + "test_out_of_descriptors_neither_spins_nor_stops_serving",
        ),
    ),
    Case(
        "control socket",
        "an unprivileged client",
        "may read status and events, may not change anything (exit code 3, one line)",
        (
            CS + "test_unprivileged_client_reads_but_may_not_change",
            CS + "test_missing_control_group_means_root_only",
            "tests/test_cli_overrides.py::test_unprivileged_user_is_refused",
        ),
    ),
)


def case(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)
