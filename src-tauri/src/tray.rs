//! The tray icon: its picture shows whether private mode is on; its tooltip and
//! first menu line say what the node serves, how many peers it has and whether
//! private mode is on (refreshed every few seconds); its menu has "Private mode"
//! (a check item), "Open SwarmLLM" and "Quit".

use swarmllm_node::Node;
use tauri::menu::{CheckMenuItem, Menu, MenuItem, PredefinedMenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Manager, Runtime};

const TRAY_ID: &str = "main";
const PRIVATE_ID: &str = "private-mode";
const ICON: &[u8] = include_bytes!("../../icons/tray.png");
const ICON_PRIVATE: &[u8] = include_bytes!("../../icons/tray-private.png");

/// How often the status line is refreshed.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// The private-mode check item, kept to update it.
struct PrivateItem<R: Runtime>(CheckMenuItem<R>);

/// The status line (a disabled menu item), kept to update it.
struct StatusItem<R: Runtime>(MenuItem<R>);

/// The node's status in one line: what it serves, its peers, private mode.
pub(crate) fn status(node: &Node) -> String {
    let ranges = node.pipeline().host().ranges();
    let serving = match node.engine() {
        Some(engine) => format!("Serving {}", engine.info().id),
        None if !ranges.is_empty() => {
            let models: std::collections::BTreeSet<&str> =
                ranges.iter().map(|r| r.model_id.as_str()).collect();
            match models.len() {
                1 => format!("Serving layers of {}", ranges[0].model_id),
                n => format!("Serving layers of {n} models"),
            }
        }
        None => "Not serving a model".to_string(),
    };
    let peers = node.network().map_or(0, |n| n.connected().len());
    let private = if node.private_mode().enabled {
        "private mode on"
    } else {
        "private mode off"
    };
    format!(
        "{serving} · {peers} peer{} · {private}",
        if peers == 1 { "" } else { "s" }
    )
}

fn icon(private: bool) -> Option<tauri::image::Image<'static>> {
    tauri::image::Image::from_bytes(if private { ICON_PRIVATE } else { ICON }).ok()
}

/// Creates the tray icon for `node`.
pub(crate) fn build<R: Runtime>(app: &AppHandle<R>, node: &Node) -> tauri::Result<()> {
    let private = node.private_mode().enabled;
    let line = MenuItem::with_id(app, "status", status(node), false, None::<&str>)?;
    let check =
        CheckMenuItem::with_id(app, PRIVATE_ID, "Private mode", true, private, None::<&str>)?;
    let open = MenuItem::with_id(app, "open", "Open SwarmLLM", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[
            &line,
            &PredefinedMenuItem::separator(app)?,
            &check,
            &open,
            &PredefinedMenuItem::separator(app)?,
            &quit,
        ],
    )?;
    app.manage(PrivateItem(check));
    app.manage(StatusItem(line));
    let mut tray = TrayIconBuilder::with_id(TRAY_ID)
        .menu(&menu)
        .tooltip(format!("SwarmLLM — {}", status(node)))
        .on_menu_event(|app, event| match event.id().as_ref() {
            PRIVATE_ID => toggle_private_mode(app),
            "open" => crate::open_window(app),
            "quit" => {
                let app = app.clone();
                tauri::async_runtime::spawn(crate::quit(app));
            }
            _ => {}
        });
    if let Some(icon) = icon(private) {
        tray = tray.icon(icon);
    }
    tray.build(app)?;
    // The status line follows the node.
    let (app, node) = (app.clone(), node.clone());
    let stop = node.shutdown_token();
    tauri::async_runtime::spawn(async move {
        let mut every = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => show_status(&app, &status(&node)),
            }
        }
    });
    Ok(())
}

/// Shows `line` as the tray's status line and tooltip.
fn show_status<R: Runtime>(app: &AppHandle<R>, line: &str) {
    if let Some(item) = app.try_state::<StatusItem<R>>() {
        let _ = item.0.set_text(line);
    }
    if let Some(tray) = app.tray_by_id(TRAY_ID) {
        let _ = tray.set_tooltip(Some(format!("SwarmLLM — {line}")));
    }
}

/// The check item was clicked: it has already flipped; make the node agree.
fn toggle_private_mode<R: Runtime>(app: &AppHandle<R>) {
    let Some(shell) = app.try_state::<crate::Shell>() else {
        return;
    };
    let node = shell.node.clone();
    let wanted = !node.private_mode().enabled;
    let app = app.clone();
    tauri::async_runtime::spawn(async move {
        if let Err(e) = crate::commands::switch_private_mode(&node, wanted).await {
            tracing::error!(error = %e, "cannot switch private mode");
            // Put the check mark back where the node is.
            show_private_mode(&app, node.private_mode().enabled);
        }
    });
}

/// Shows `private` in the tray (check mark, picture, status line).
pub(crate) fn show_private_mode<R: Runtime>(app: &AppHandle<R>, private: bool) {
    if let Some(item) = app.try_state::<PrivateItem<R>>() {
        let _ = item.0.set_checked(private);
    }
    if let Some(tray) = app.tray_by_id(TRAY_ID) {
        let _ = tray.set_icon(icon(private));
    }
    if let Some(shell) = app.try_state::<crate::Shell>() {
        show_status(app, &status(&shell.node));
    }
}

/// What the tray shows now: its status line, and whether "Private mode" is checked.
pub(crate) fn shown<R: Runtime>(app: &AppHandle<R>) -> (String, bool) {
    let line = app
        .try_state::<StatusItem<R>>()
        .and_then(|i| i.0.text().ok())
        .unwrap_or_default();
    let checked = app
        .try_state::<PrivateItem<R>>()
        .and_then(|i| i.0.is_checked().ok())
        .unwrap_or(false);
    (line, checked)
}
