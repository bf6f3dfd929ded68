//! GPT
