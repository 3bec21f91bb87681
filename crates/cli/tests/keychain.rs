//! Secrets in a real OS keychain: a GNOME Keyring (Secret Service over D-Bus) in a
//! private D-Bus session. Skips, saying so, where `dbus-run-session` or
//! `gnome-keyring-daemon` or `secret-tool` is missing; `scripts/test` installs them on Debian.

mod common;

use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn identity_and_api_key_live_in_the_os_keychain_when_one_runs() {
    if !have("dbus-run-session") || !have("gnome-keyring-daemon") || !have("secret-tool") {
        eprintln!(
            "SKIPPED: needs dbus-run-session, gnome-keyring-daemon and secret-tool (apt-get install dbus gnome-keyring libsecret-tools)"
        );
        return;
    }
    let home = tempfile::tempdir().expect("home");
    let data = tempfile::tempdir().expect("data");
    let api = common::free_port();
    // Inside one private session bus: unlock a fresh keyring, start the node twice
    // (a restart), and print what it reports.
    let script = format!(
        r#"set -e
mkdir -p "$XDG_DATA_HOME/keyrings"
printf '\n' | gnome-keyring-daemon --replace --daemonize --unlock --components=secrets >/dev/null 2>&1
# Wait until the login collection takes writes: a client arriving earlier can land
# in a transient collection (or start a second, locked daemon) and lose its items.
for i in $(seq 1 100); do
  printf ready | secret-tool store --label=probe swarmllm-test ready 2>/dev/null \
    && [ "$(secret-tool lookup swarmllm-test ready 2>/dev/null)" = ready ] && break
  sleep 0.05
done
run() {{
  SWARMLLM_P2P_ENABLED=false "$BIN" --data-dir "$DATA" --api-port {api} serve 2>>"$DATA/node.log" &
  pid=$!
  for i in $(seq 1 200); do "$BIN" --data-dir "$DATA" --api-port {api} status --json >"$DATA/status.json" 2>/dev/null && break; sleep 0.05; done
  kill $pid; wait $pid || true
}}
run
echo "first=$(grep -o '"node_id": "[0-9a-f]*"' "$DATA/status.json" | head -1)"
echo "store=$(grep -o '"secret_store": "[a-z_]*"' "$DATA/status.json")"
echo "key1=$("$BIN" --data-dir "$DATA" api-key)"
run
echo "second=$(grep -o '"node_id": "[0-9a-f]*"' "$DATA/status.json" | head -1)"
echo "key2=$("$BIN" --data-dir "$DATA" api-key)"
"#
    );
    let out = Command::new("dbus-run-session")
        .args(["--", "bash", "-c", &script])
        .env("BIN", common::bin())
        .env("DATA", data.path())
        .env("HOME", home.path())
        .env("XDG_DATA_HOME", home.path().join("share"))
        .env_remove("SWARMLLM_API_KEY")
        .env_remove("SWARMLLM_SECRET_STORE")
        .output()
        .expect("dbus-run-session");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(data.path().join("node.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        field("store"),
        r#""secret_store": "keychain""#,
        "{stdout}\n{log}"
    );
    assert!(field("first").len() > 20, "{stdout}");
    assert_eq!(
        field("first"),
        field("second"),
        "the identity must survive a restart"
    );
    assert!(field("key1").starts_with("swl-"), "{stdout}");
    assert_eq!(field("key1"), field("key2"));
    // Nothing secret was written to the data dir.
    assert!(
        !data.path().join("secrets.enc").exists(),
        "the file fallback must not be used"
    );
    assert!(
        !log.contains(&field("key1")),
        "the API key must never be logged"
    );
}
