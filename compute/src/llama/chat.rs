//! How a chat model wants a conversation laid out, and where its turn ends.
//! The GGUF's own chat template is used when it has one llama.cpp can
//! render; otherwise a built-in template named for the architecture. The
//! template's turn markers (`<|im_end|>`, `<end_of_turn>`, …) end generation
//! and never reach the caller: a small model often spells one out as plain
//! text instead of emitting its end-of-generation token.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};

use super::{engine, ComputeError};

/// Where a model's chat template came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The GGUF's `tokenizer.chat_template`.
    Embedded,
    /// llama.cpp's built-in template of this name.
    BuiltIn(&'static str),
}

/// The built-in llama.cpp template for a model of architecture `arch`
/// (`general.architecture`) that carries none of its own.
pub fn builtin_template(arch: &str) -> &'static str {
    match arch {
        a if a.starts_with("gemma") => "gemma",
        "phi3" => "phi3",
        "granite" | "granitemoe" => "granite",
        "exaone" => "exaone3",
        "chatglm" => "chatglm4",
        "command-r" | "cohere2" => "command-r",
        // The most common layout among small instruction-tuned models.
        _ => "chatml",
    }
}

/// Text that opens or closes a turn in the templates llama.cpp knows. A
/// template's own markers are the ones that appear in what it renders.
const TURN_MARKERS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|start_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|EOT|>",
    "[INST]",
    "</s>",
];

/// The turn markers that occur in any of `texts` (a rendered conversation,
/// the template's source).
pub fn turn_markers(texts: &[&str]) -> Vec<String> {
    TURN_MARKERS
        .iter()
        .filter(|m| texts.iter().any(|t| t.contains(*m)))
        .map(|m| (*m).to_owned())
        .collect()
}

/// A conversation with every role, rendered once at load time to check the
/// template and to learn its markers.
fn probe() -> [(String, String); 4] {
    [
        ("system", "Be brief."),
        ("user", "Hello there."),
        ("assistant", "Hello."),
        ("user", "Goodbye."),
    ]
    .map(|(r, c)| (r.to_owned(), c.to_owned()))
}

fn render(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    messages: &[(String, String)],
) -> Result<String, ComputeError> {
    if messages.is_empty() {
        return Err(ComputeError::EmptyInput);
    }
    let msgs = messages
        .iter()
        .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()).map_err(engine))
        .collect::<Result<Vec<_>, _>>()?;
    model
        .apply_chat_template(template, &msgs, true)
        .map_err(engine)
}

/// A model's chat template and the markers that end its turn.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    template: LlamaChatTemplate,
    source: TemplateSource,
    stops: Vec<String>,
}

impl ChatFormat {
    /// The format `model` asks for: its own template when llama.cpp can
    /// render it, else the built-in one for its architecture.
    pub fn of(model: &LlamaModel) -> Result<Self, ComputeError> {
        if let Ok(template) = model.chat_template(None) {
            match render(model, &template, &probe()) {
                Ok(rendered) => {
                    let source = template.to_str().unwrap_or_default();
                    let stops = turn_markers(&[&rendered, source]);
                    return Ok(ChatFormat {
                        template,
                        source: TemplateSource::Embedded,
                        stops,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "embedded chat template not understood"),
            }
        }
        let arch = model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        let name = builtin_template(&arch);
        let template = LlamaChatTemplate::new(name).map_err(engine)?;
        let rendered = render(model, &template, &probe())?;
        Ok(ChatFormat {
            template,
            source: TemplateSource::BuiltIn(name),
            stops: turn_markers(&[&rendered]),
        })
    }

    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// Text that ends the model's turn when it appears in its output.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// `messages` (role, content) rendered into a prompt that ends where the
    /// assistant's turn begins.
    pub fn prompt(
        &self,
        model: &LlamaModel,
        messages: &[(String, String)],
    ) -> Result<String, ComputeError> {
        render(model, &self.template, messages)
    }
}

/// Finds stop text in generated text that arrives piece by piece. Text that
/// might be the start of a stop is held back until the next piece settles
/// it, so no part of a marker is ever handed on.
pub struct StopScanner<'a> {
    stops: &'a [String],
    held: String,
}

/// What one piece of generated text came to.
#[derive(Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Text safe to hand on now (may be empty).
    pub text: String,
    /// A stop was found: the turn is over and `text` is all that is left.
    pub stopped: bool,
}

impl<'a> StopScanner<'a> {
    pub fn new(stops: &'a [String]) -> Self {
        StopScanner {
            stops,
            held: String::new(),
        }
    }

    /// A control token, by its name: one that opens or closes a turn ends
    /// the turn (handing on what was held back); any other is not text and
    /// is dropped.
    pub fn push_control(&mut self, name: &str) -> Scanned {
        if self.stops.iter().any(|s| s == name) {
            Scanned {
                text: std::mem::take(&mut self.held),
                stopped: true,
            }
        } else {
            Scanned {
                text: String::new(),
                stopped: false,
            }
        }
    }

    pub fn push(&mut self, piece: &str) -> Scanned {
        self.held.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.held.truncate(at);
            return Scanned {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.undecided_tail();
        let text = self.held[..keep].to_owned();
        self.held.drain(..keep);
        Scanned {
            text,
            stopped: false,
        }
    }

    /// The text still held back, once generation has ended another way.
    pub fn finish(self) -> String {
        self.held
    }

    /// Where the longest tail of the held text that could still grow into a
    /// stop begins (the held text's length when none could).
    fn undecided_tail(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        (earliest..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Feeds `pieces` through a scanner the way generation does; returns
    /// the text handed on and whether a stop ended it.
    fn run(stops: &[String], pieces: &[&str]) -> (String, bool) {
        let mut scanner = StopScanner::new(stops);
        let mut out = String::new();
        for piece in pieces {
            let s = scanner.push(piece);
            out.push_str(&s.text);
            if s.stopped {
                return (out, true);
            }
        }
        out.push_str(&scanner.finish());
        (out, false)
    }

    #[test]
    fn architectures_without_a_template_get_their_family_one() {
        assert_eq!(builtin_template("gemma3"), "gemma");
        assert_eq!(builtin_template("gemma"), "gemma");
        assert_eq!(builtin_template("phi3"), "phi3");
        assert_eq!(builtin_template("qwen2"), "chatml");
        assert_eq!(builtin_template("llama"), "chatml");
        assert_eq!(builtin_template(""), "chatml");
    }

    #[test]
    fn markers_are_those_the_template_uses() {
        let chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(
            turn_markers(&[chatml]),
            stops(&["<|im_start|>", "<|im_end|>"])
        );
        let gemma = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n";
        assert_eq!(
            turn_markers(&[gemma]),
            stops(&["<start_of_turn>", "<end_of_turn>"])
        );
        assert_eq!(
            turn_markers(&["no markers", "{{ eos_token }}</s>"]),
            stops(&["</s>"])
        );
        assert!(turn_markers(&["plain text"]).is_empty());
    }

    #[test]
    fn text_stops_at_a_marker_and_the_marker_is_not_handed_on() {
        let s = stops(&["<|im_end|>", "<|im_start|>"]);
        assert_eq!(
            run(&s, &["The capital", " is Paris.", "<|im_end|>", "junk"]),
            ("The capital is Paris.".into(), true)
        );
        // Spelled out over several pieces, as a small model may.
        assert_eq!(
            run(&s, &["Paris.", "<", "|im", "_end", "|>", "\nmore"]),
            ("Paris.".into(), true)
        );
        // Inside one piece, with text either side.
        assert_eq!(
            run(&s, &["Paris.<|im_start|>user\nand"]),
            ("Paris.".into(), true)
        );
        // The earliest of two stops wins.
        assert_eq!(run(&s, &["a<|im_start|>b<|im_end|>"]), ("a".into(), true));
    }

    #[test]
    fn text_that_only_looks_like_a_marker_comes_through_whole() {
        let s = stops(&["<end_of_turn>"]);
        assert_eq!(
            run(&s, &["1 <", " 2 and <end", "_of_line>"]),
            ("1 < 2 and <end_of_line>".into(), false)
        );
        // A prefix left at the end is text, not a marker.
        assert_eq!(run(&s, &["x <end_of"]), ("x <end_of".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn text_is_handed_on_as_soon_as_it_cannot_be_a_marker() {
        let s = stops(&["<|im_end|>"]);
        let mut scanner = StopScanner::new(&s);
        let hold = |text: &str| Scanned {
            text: text.into(),
            stopped: false,
        };
        assert_eq!(scanner.push("Paris"), hold("Paris"));
        assert_eq!(scanner.push(" <|"), hold(" "));
        assert_eq!(scanner.push("x"), hold("<|x"));
        assert_eq!(scanner.push("é<|im_"), hold("é"));
        assert_eq!(scanner.finish(), "<|im_");
    }

    #[test]
    fn a_control_token_ends_the_turn_only_when_it_is_a_marker() {
        let s = stops(&["<|im_end|>", "<|im_start|>"]);
        let mut scanner = StopScanner::new(&s);
        assert_eq!(scanner.push("1 <").text, "1 ");
        let dropped = scanner.push_control("<repo_name>");
        assert_eq!((dropped.text.as_str(), dropped.stopped), ("", false));
        // What was held back is text the model wrote before the marker.
        let end = scanner.push_control("<|im_start|>");
        assert_eq!((end.text.as_str(), end.stopped), ("<", true));
    }

    /// A GGUF holding only metadata: enough for llama.cpp to load a
    /// vocabulary-less model and render its chat template.
    fn metadata_only_gguf(path: &std::path::Path, kv: &[(&str, &str)]) {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        }
        const VERSION: u32 = 3;
        const STRING: u32 = 8;
        let mut b = b"GGUF".to_vec();
        b.extend(VERSION.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            put_str(&mut b, k);
            b.extend(STRING.to_le_bytes());
            put_str(&mut b, v);
        }
        b.resize(b.len().next_multiple_of(32), 0);
        std::fs::write(path, b).unwrap();
    }

    fn format_of(arch: &str, template: Option<&str>) -> (ChatFormat, LlamaModel) {
        let path = std::env::temp_dir().join(format!(
            "crank-chat-{}-{arch}-{}.gguf",
            std::process::id(),
            template.is_some()
        ));
        let mut kv = vec![
            ("general.architecture", arch),
            ("tokenizer.ggml.model", "none"),
        ];
        if let Some(t) = template {
            kv.push(("tokenizer.chat_template", t));
        }
        metadata_only_gguf(&path, &kv);
        let params = llama_cpp_2::model::params::LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(super::super::backend().unwrap(), &path, &params)
            .expect("a metadata-only GGUF loads as a vocabulary-only model");
        let _ = std::fs::remove_file(&path);
        (ChatFormat::of(&model).unwrap(), model)
    }

    fn user(q: &str) -> Vec<(String, String)> {
        vec![("user".into(), q.into())]
    }

    /// SmolLM2-Instruct's own template (ChatML with a default system turn).
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn an_embedded_template_is_used_with_its_markers() {
        let (format, model) = format_of("llama", Some(SMOLLM2_TEMPLATE));
        assert_eq!(format.source(), TemplateSource::Embedded);
        assert_eq!(format.stops(), stops(&["<|im_start|>", "<|im_end|>"]));
        let prompt = format
            .prompt(&model, &user("What is the capital of France?"))
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn without_a_template_the_architecture_picks_one() {
        let (format, model) = format_of("gemma3", None);
        assert_eq!(format.source(), TemplateSource::BuiltIn("gemma"));
        assert_eq!(format.stops(), stops(&["<start_of_turn>", "<end_of_turn>"]));
        let conversation = vec![
            ("system".into(), "Answer in one word.".into()),
            ("user".into(), "Capital of France?".into()),
        ];
        assert_eq!(
            format.prompt(&model, &conversation).unwrap(),
            "<start_of_turn>user\nAnswer in one word.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );

        let (format, model) = format_of("qwen2", None);
        assert_eq!(format.source(), TemplateSource::BuiltIn("chatml"));
        assert!(format
            .prompt(&model, &user("Hi"))
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
        assert!(matches!(
            format.prompt(&model, &[]),
            Err(ComputeError::EmptyInput)
        ));
    }

    #[test]
    fn a_template_llama_cpp_cannot_render_falls_back_to_the_built_in_one() {
        let (format, _model) = format_of("gemma3", Some("{{ something unknown }}"));
        assert_eq!(format.source(), TemplateSource::BuiltIn("gemma"));
    }
}
