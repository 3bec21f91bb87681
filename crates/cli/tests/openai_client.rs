//! The official `openai` Python package, unmodified, against a real node.
//! Skips (saying so) when the package is not installed; `.ci/run` installs it.

mod common;

use std::process::Command;

use common::TestNode;

#[test]
fn official_openai_python_client_works_unmodified() {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        eprintln!("SKIPPED: the `openai` Python package is not installed (pip install openai)");
        return;
    }
    let node = TestNode::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .env("OPENAI_BASE_URL", format!("{}/v1", node.base))
        .env("OPENAI_API_KEY", &node.key)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}
