//! The engine's LoRA adapters. llama.cpp applies adapters to a whole context,
//! so every sequence decoded together runs with the same one: the engine
//! switches only when no sequence runs (a request for another adapter waits
//! for the running ones to finish), and forgets its prompt cache when it does
//! (KV computed with one adapter is no prefix for another).
//!
//! Loading an adapter needs the model mutably (llama.cpp records it in the
//! model), which a live context borrows: the engine thread, sole owner of the
//! model, drops its context, loads the adapter and makes a new context
//! (`slots::Exit::LoadAdapter`). Loaded adapters stay with the model
//! (llama.cpp frees them with it), so at most [`MAX_LOADED`] distinct files
//! are loaded per model load.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use super::{GenerateError, LoraChoice};

/// Distinct adapter files one loaded model takes.
pub(super) const MAX_LOADED: usize = 16;

/// The adapters loaded into the model, and which one the current context
/// runs with.
#[derive(Default)]
pub(super) struct Loras {
    /// Loaded adapters by file digest.
    loaded: Vec<(String, LlamaLoraAdapter)>,
    /// The digest and scale the context runs with.
    active: Option<(String, u32)>,
}

/// Switching the context's adapter failed.
pub(super) enum Switch {
    /// The adapter is not loaded: the engine must load it (without a context).
    NotLoaded,
    /// It cannot be used.
    Failed(GenerateError),
}

fn key(choice: Option<&LoraChoice>) -> Option<(String, u32)> {
    choice.map(|c| (c.digest.clone(), c.scale.to_bits()))
}

impl Loras {
    /// A new context runs with no adapter.
    pub(super) fn new_context(&mut self) {
        self.active = None;
    }

    /// Whether the context already runs with `choice`.
    pub(super) fn is_active(&self, choice: Option<&LoraChoice>) -> bool {
        self.active == key(choice)
    }

    /// Makes the context run with `choice` (no sequence may be running).
    pub(super) fn activate(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        choice: Option<&LoraChoice>,
    ) -> Result<(), Switch> {
        let failed = |e: String| Switch::Failed(GenerateError::Adapter(e));
        match choice {
            None => {
                if let Some((_, a)) = self.loaded.first_mut() {
                    // Clears every adapter (the argument is not used).
                    ctx.lora_adapter_remove(a)
                        .map_err(|e| failed(e.to_string()))?;
                }
            }
            Some(c) => {
                let Some((_, a)) = self.loaded.iter_mut().find(|(d, _)| *d == c.digest) else {
                    return Err(Switch::NotLoaded);
                };
                ctx.lora_adapter_set(a, c.scale)
                    .map_err(|e| failed(e.to_string()))?;
            }
        }
        self.active = key(choice);
        Ok(())
    }

    /// Loads `choice` into `model` (no context may exist).
    pub(super) fn load(
        &mut self,
        model: &mut LlamaModel,
        choice: &LoraChoice,
    ) -> Result<(), GenerateError> {
        if self.loaded.iter().any(|(d, _)| *d == choice.digest) {
            return Ok(());
        }
        if self.loaded.len() >= MAX_LOADED {
            return Err(GenerateError::Adapter(format!(
                "{MAX_LOADED} adapters are loaded for this model already; restart the node \
                 to use others"
            )));
        }
        if !choice.file.is_file() {
            return Err(GenerateError::Adapter(format!(
                "{} is gone",
                choice.file.display()
            )));
        }
        let adapter = model
            .lora_adapter_init(&choice.file)
            .map_err(|e| GenerateError::Adapter(format!("llama.cpp could not load it: {e}")))?;
        tracing::info!(file = %choice.file.display(), "LoRA adapter loaded");
        self.loaded.push((choice.digest.clone(), adapter));
        Ok(())
    }
}
