//! The benchmark's quick mode, run on the lab so the benchmark code keeps
//! working. It asserts that every candidate produced measurements and that
//! the outputs rendered; nothing about timing. Needs root (as `make test`
//! runs on CI) and the workspace binaries built (`cargo build`).

use lb_bench::driver::{self, CandidateKind, Config};

#[test]
fn quick_mode_measures_every_candidate() {
    lb_e2e::scenario::require_root();
    let out = std::env::temp_dir().join(format!("lb-bench-quick-test-{}", std::process::id()));
    let cfg = Config {
        crr: Some(env!("CARGO_BIN_EXE_crr").into()),
        ..Config::quick(out.clone())
    };
    let outcome = driver::run(&cfg).expect("quick benchmark runs");

    for &count in &cfg.counts {
        for kind in CandidateKind::ALL {
            let row = outcome
                .rows
                .iter()
                .find(|r| r.services == count && r.candidate == kind)
                .unwrap_or_else(|| panic!("no row for {} at {count}", kind.name()));
            assert!(row.crr_cps > 0.0, "{row:?}");
            assert!(row.rr_tps > 0.0, "{row:?}");
            assert!(row.p50_us > 0.0 && row.p99_us > 0.0, "{row:?}");
            assert!(row.crr_ratio.is_some_and(|r| r.median > 0.0), "{row:?}");
            if kind != CandidateKind::Direct {
                assert!(row.program_s.is_some_and(|s| s > 0.0), "{row:?}");
            }
        }
    }
    assert_eq!(
        outcome.rows.len(),
        cfg.counts.len() * CandidateKind::ALL.len()
    );

    let table = &outcome.table;
    assert!(
        table.starts_with("| services | candidate | CRR conn/s"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 2 + outcome.rows.len(), "{table}");
    for kind in CandidateKind::ALL {
        assert!(table.contains(&format!("| {} ", kind.name())), "{table}");
    }
    let report = std::fs::read_to_string(out.join("latest.md")).expect("latest.md");
    assert!(report.contains(table.as_str()));
    assert!(
        report.contains("### Cost of NetworkPolicy enforcement"),
        "{report}"
    );
    let svg = std::fs::read_to_string(out.join("crr.svg")).expect("crr.svg");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("latest.json")).unwrap()).unwrap();
    assert!(raw["rows"]
        .as_array()
        .is_some_and(|r| r.len() == outcome.rows.len()));
    println!("{table}");
    let _ = std::fs::remove_dir_all(&out);
}
