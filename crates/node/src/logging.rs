//! `tracing` set-up shared by the CLI and the desktop app.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Installs the global subscriber: `format` is `human` or `json`, `filter` an
/// `EnvFilter` directive (`RUST_LOG` wins when set). llama.cpp's own chatter is kept
/// at `warn` unless asked for. Logs go to stderr. Calling it twice is harmless.
pub fn init(format: &str, filter: &str) {
    // libp2p's Kademlia warns on every periodic bootstrap of a node that has no peers
    // yet, which is the normal state of a fresh node.
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        format!("{filter},llama-cpp-2=warn,llama_cpp_2=warn,llama.cpp=warn,libp2p_kad=error")
    });
    let env_filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::NONE);
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
