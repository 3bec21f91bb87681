//! A bare llama-cpp-2 decode loop: the baseline `swarmllm bench` compares the node's
//! HTTP path against. No queue, no channels, no stop sequences: tokenize, decode the
//! prompt, then greedy-sample and decode one token at a time — or, batched, the
//! same for several sequences decoded together (the ceiling for the engine's
//! continuous batching).

use std::time::Instant;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::engine::{backend, context_params, decode_prompt};
use super::{EngineConfig, GenerateError, LoadModelError};

/// Timings of one bare run.
#[derive(Debug, Clone, Copy)]
pub struct BareRun {
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Seconds from the start of prompt processing to the first sampled token.
    pub prompt_secs: f64,
    /// Tokens generated after the first.
    pub decode_tokens: u32,
    /// Seconds spent generating them.
    pub decode_secs: f64,
}

/// Timings of one bare batched run.
#[derive(Debug, Clone, Copy)]
pub struct BareBatchedRun {
    /// Sequences decoded together.
    pub sequences: usize,
    /// Seconds until every sequence had its first token (prompts decoded).
    pub first_token_secs: f64,
    /// Tokens generated after the first, over all sequences.
    pub decode_tokens: u64,
    /// Seconds spent generating them.
    pub decode_secs: f64,
}

/// The model loaded for bare runs.
pub struct BareBench {
    model: LlamaModel,
    config: EngineConfig,
}

impl std::fmt::Debug for BareBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareBench").finish_non_exhaustive()
    }
}

impl BareBench {
    /// Loads the model with the same parameters the engine uses.
    pub fn load(config: EngineConfig) -> Result<Self, LoadModelError> {
        let backend = backend(config.backends_dir.as_deref())?;
        let params = LlamaModelParams::default().with_n_gpu_layers(super::engine::offload(&config));
        let model =
            LlamaModel::load_from_file(backend, &config.model_path, &params).map_err(|e| {
                LoadModelError::Load {
                    path: config.model_path.clone(),
                    message: e.to_string(),
                }
            })?;
        Ok(Self { model, config })
    }

    /// Tokens of `prompt` as the engine would tokenize it.
    pub fn prompt_tokens(&self, prompt: &str) -> usize {
        self.model
            .vocab()
            .tokenize(prompt.as_bytes(), true, true)
            .len()
    }

    /// Generates exactly `n_predict` tokens greedily (end-of-generation ignored).
    pub fn run(&self, prompt: &str, n_predict: u32) -> Result<BareRun, GenerateError> {
        let backend = backend(None).map_err(|e| GenerateError::Decode(e.to_string()))?;
        let mut ctx = self
            .model
            .new_context(backend, context_params(&self.config))
            .map_err(|e| GenerateError::Decode(e.to_string()))?;
        let mut batch = LlamaBatch::new(self.config.batch_size as usize, 1);
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        let mut sampler = LlamaSampler::greedy();
        let mut piece = Vec::with_capacity(32);

        let t0 = Instant::now();
        decode_prompt(&mut ctx, &mut batch, &tokens)?;
        let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
        let prompt_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let first_pos = tokens.len() as i32;
        for pos in first_pos..first_pos + n_predict as i32 - 1 {
            piece.clear();
            self.model
                .vocab()
                .token_to_piece_into(token, &mut piece, false, None);
            batch.clear();
            batch
                .add(token, pos, &[0], true)
                .map_err(|e| GenerateError::Decode(e.to_string()))?;
            ctx.decode(&mut batch)
                .map_err(|e| GenerateError::Decode(e.to_string()))?;
            token = sampler.sample(&ctx, 0);
        }
        Ok(BareRun {
            prompt_tokens: tokens.len() as u32,
            prompt_secs,
            decode_tokens: n_predict.saturating_sub(1),
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }

    /// `sequences` copies of `prompt`, each generating exactly `n_predict`
    /// tokens greedily, decoded together in one batch per step, in a context
    /// laid out as the engine lays out its own (one KV stream per sequence).
    pub fn run_batched(
        &self,
        prompt: &str,
        n_predict: u32,
        sequences: usize,
    ) -> Result<BareBatchedRun, GenerateError> {
        let err = |e: &dyn std::fmt::Display| GenerateError::Decode(e.to_string());
        let backend = backend(None).map_err(|e| err(&e))?;
        let n = sequences.max(1);
        let params = context_params(&self.config)
            .with_n_ctx(std::num::NonZeroU32::new(
                self.config.context_size.saturating_mul(n as u32),
            ))
            .with_n_seq_max(n as u32)
            .with_kv_unified(false);
        let mut ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| err(&e))?;
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        let mut batch = LlamaBatch::new((self.config.batch_size as usize).max(n), 1);
        let mut samplers: Vec<LlamaSampler> = (0..n).map(|_| LlamaSampler::greedy()).collect();
        let chunk = (ctx.n_batch() as usize).max(1);

        // Prompts, packed into batches as the engine packs them; each
        // sequence's first token is sampled as soon as its prompt is in.
        let t0 = Instant::now();
        let mut next = vec![LlamaToken(0); n];
        let all: Vec<(usize, usize)> = (0..n)
            .flat_map(|s| (0..tokens.len()).map(move |i| (s, i)))
            .collect();
        let last = tokens.len() - 1;
        for part in all.chunks(chunk) {
            batch.clear();
            for &(s, i) in part {
                batch
                    .add(tokens[i], i as i32, &[s as i32], i == last)
                    .map_err(|e| err(&e))?;
            }
            ctx.decode(&mut batch).map_err(|e| err(&e))?;
            for (at, &(s, i)) in part.iter().enumerate() {
                if i == last {
                    next[s] = samplers[s].sample(&ctx, at as i32);
                }
            }
        }
        let first_token_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let first_pos = tokens.len() as i32;
        for pos in first_pos..first_pos + n_predict as i32 - 1 {
            batch.clear();
            for (s, token) in next.iter().enumerate() {
                batch
                    .add(*token, pos, &[s as i32], true)
                    .map_err(|e| err(&e))?;
            }
            ctx.decode(&mut batch).map_err(|e| err(&e))?;
            for (s, token) in next.iter_mut().enumerate() {
                *token = samplers[s].sample(&ctx, s as i32);
            }
        }
        Ok(BareBatchedRun {
            sequences: n,
            first_token_secs,
            decode_tokens: u64::from(n_predict.saturating_sub(1)) * n as u64,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
