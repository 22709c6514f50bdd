//! The Tessera coordinator: turns user requests into work for the workers.
//!
//! Today it holds the text side of serving: [`tokenizer`] (Hugging Face `tokenizer.json`, with
//! streaming detokenisation). The cluster plan, scheduler and public APIs join it in later issues.

pub mod tokenizer;
