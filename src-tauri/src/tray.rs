//! The tray icon: its picture and tooltip show whether private mode is on; its
//! menu has "Private mode" (a check item), "Open SwarmLLM" and "Quit".

use swarmllm_node::Node;
use tauri::menu::{CheckMenuItem, Menu, MenuItem, PredefinedMenuItem};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Manager, Runtime};

const TRAY_ID: &str = "main";
const PRIVATE_ID: &str = "private-mode";
const ICON: &[u8] = include_bytes!("../../icons/tray.png");
const ICON_PRIVATE: &[u8] = include_bytes!("../../icons/tray-private.png");

/// The private-mode check item, kept to update it.
struct PrivateItem<R: Runtime>(CheckMenuItem<R>);

fn tooltip(private: bool) -> &'static str {
    if private {
        "SwarmLLM — private mode on: prompts stay on your devices"
    } else {
        "SwarmLLM"
    }
}

fn icon(private: bool) -> Option<tauri::image::Image<'static>> {
    tauri::image::Image::from_bytes(if private { ICON_PRIVATE } else { ICON }).ok()
}

/// Creates the tray icon for `node`.
pub(crate) fn build<R: Runtime>(app: &AppHandle<R>, node: &Node) -> tauri::Result<()> {
    let private = node.private_mode().enabled;
    let check =
        CheckMenuItem::with_id(app, PRIVATE_ID, "Private mode", true, private, None::<&str>)?;
    let open = MenuItem::with_id(app, "open", "Open SwarmLLM", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[&check, &open, &PredefinedMenuItem::separator(app)?, &quit],
    )?;
    app.manage(PrivateItem(check));
    let mut tray = TrayIconBuilder::with_id(TRAY_ID)
        .menu(&menu)
        .tooltip(tooltip(private))
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
    Ok(())
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

/// Shows `private` in the tray (check mark, picture, tooltip).
pub(crate) fn show_private_mode<R: Runtime>(app: &AppHandle<R>, private: bool) {
    if let Some(item) = app.try_state::<PrivateItem<R>>() {
        let _ = item.0.set_checked(private);
    }
    if let Some(tray) = app.tray_by_id(TRAY_ID) {
        let _ = tray.set_tooltip(Some(tooltip(private)));
        let _ = tray.set_icon(icon(private));
    }
}
