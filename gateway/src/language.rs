//! Which language a question is in, when the client does not say.
//!
//! whatlang's trigram detector, limited to languages Qwen2.5 answers well
//! (fewer candidates, fewer confusions), and trusted only from a confidence
//! of [`MIN_CONFIDENCE`]: a wrong language is worse than none, since without
//! one the model answers in the question's language by itself. (whatlang's
//! own `is_reliable` refuses nearly every one-line question; at 0.5 a short
//! Arabic or Spanish question passes and a misread German one does not.)

use std::sync::LazyLock;

use whatlang::{Detector, Lang};

/// Qwen2.5's multilingual set as whatlang names it (Chinese is `Cmn`).
const QWEN_LANGUAGES: [Lang; 29] = [
    Lang::Eng,
    Lang::Cmn,
    Lang::Spa,
    Lang::Fra,
    Lang::Por,
    Lang::Deu,
    Lang::Ita,
    Lang::Rus,
    Lang::Jpn,
    Lang::Kor,
    Lang::Vie,
    Lang::Tha,
    Lang::Ara,
    Lang::Ind,
    Lang::Tur,
    Lang::Nld,
    Lang::Pol,
    Lang::Ukr,
    Lang::Ces,
    Lang::Heb,
    Lang::Hin,
    Lang::Ben,
    Lang::Urd,
    Lang::Pes,
    Lang::Ell,
    Lang::Hun,
    Lang::Ron,
    Lang::Swe,
    Lang::Tgl,
];

/// Least confidence a detection needs to be used.
pub const MIN_CONFIDENCE: f64 = 0.5;

static DETECTOR: LazyLock<Detector> =
    LazyLock::new(|| Detector::with_allowlist(QWEN_LANGUAGES.to_vec()));

/// The question's language as an English name (what the worker's prompt
/// says: "Answer in Spanish"), or `None` when the guess is not confident.
pub fn detect(text: &str) -> Option<&'static str> {
    let info = DETECTOR.detect(text)?;
    (info.confidence() >= MIN_CONFIDENCE).then(|| name(info.lang()))
}

/// A bounded label for metrics: a known language's name, else `other`
/// (client-given languages are free text and must not become label values).
pub fn metric_label(language: Option<&str>) -> &'static str {
    let Some(language) = language else {
        return "unknown";
    };
    QWEN_LANGUAGES
        .iter()
        .map(|lang| name(*lang))
        .find(|known| known.eq_ignore_ascii_case(language))
        .or_else(|| {
            let lang = Lang::from_code(language.to_ascii_lowercase())?;
            QWEN_LANGUAGES.contains(&lang).then(|| name(lang))
        })
        .unwrap_or("other")
}

fn name(lang: Lang) -> &'static str {
    match lang {
        // whatlang says "Mandarin"; the written language is Chinese.
        Lang::Cmn => "Chinese",
        Lang::Pes => "Persian",
        other => other.eng_name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_four_test_languages() {
        let cases = [
            (
                "Why does the moon change its shape during the month?",
                "English",
            ),
            (
                "为什么月亮在一个月里会改变形状？请一步一步地解释。",
                "Chinese",
            ),
            (
                "¿Por qué la luna cambia de forma durante el mes?",
                "Spanish",
            ),
            ("لماذا يتغير شكل القمر خلال الشهر؟", "Arabic"),
        ];
        for (text, language) in cases {
            assert_eq!(detect(text), Some(language), "{text}");
        }
    }

    #[test]
    fn too_little_text_is_not_guessed() {
        assert_eq!(detect("ok"), None);
        assert_eq!(detect("How do I solve 2x + 3 = 7?"), None);
        // Read as English with 4 % confidence: better no language than that.
        assert_eq!(detect("Was ist Photosynthese?"), None);
    }

    #[test]
    fn metric_labels_are_bounded() {
        assert_eq!(metric_label(Some("spanish")), "Spanish");
        assert_eq!(metric_label(Some("spa")), "Spanish");
        assert_eq!(metric_label(Some("Klingon <script>")), "other");
        assert_eq!(metric_label(None), "unknown");
    }
}
