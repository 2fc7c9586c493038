//! Which language a question is in, when the client does not say.
//!
//! The worker detects it when it reads the question (it builds the prompt
//! that names it); the gateway only labels metrics with
//! [`metric_label`]. Detection costs a few hundred microseconds of CPU,
//! more than the rest of an accept: on the edge it would halve how many
//! questions a gateway takes, beside inference it is nothing.
//!
//! Two detectors limited to the languages Qwen2.5 answers well (fewer
//! candidates, fewer confusions) must agree, and one of them must be sure:
//! whatlang from a confidence of [`MIN_CONFIDENCE`] or lingua from
//! [`MIN_LINGUA_CONFIDENCE`]. A wrong language is worse than none, since
//! without one the model answers in the question's language by itself.
//!
//! Why both: whatlang alone names too few one-line questions (193 of the 232
//! in `tests/data/short_questions.tsv`; `is_reliable` refuses nearly all).
//! lingua alone names more, but no threshold of its own both keeps a misread
//! "Was ist Photosynthese?" (English, 0.52) out and lets a plain Spanish
//! sentence (0.43: Portuguese and Italian share its n-grams) in. Agreement
//! does: 210 of the 232, none wrong, and on lingua's 28,141 test sentences in
//! these languages 27,138 named with 44 wrong where whatlang alone names
//! 26,376 with 116 wrong.
//!
//! lingua runs in high-accuracy mode: its low-accuracy mode saves no memory
//! here (all n-gram sizes share one model file per language) and names short
//! questions wrongly with high confidence. The models are compiled into the
//! binary (about 140 MB) and read in place, so what detection adds to the
//! resident set is mostly clean file pages the kernel can drop (about 110 MB
//! once most models have been read), plus ~2 MB of heap; a detection takes
//! about half a millisecond.

use std::sync::LazyLock;

use lingua::{Language, LanguageDetector, LanguageDetectorBuilder};
use whatlang::{Detector, Lang};

/// Qwen2.5's multilingual set as whatlang and lingua name each language
/// (whatlang's Chinese is `Cmn`, its Persian `Pes`).
const QWEN_LANGUAGES: [(Lang, Language); 29] = [
    (Lang::Eng, Language::English),
    (Lang::Cmn, Language::Chinese),
    (Lang::Spa, Language::Spanish),
    (Lang::Fra, Language::French),
    (Lang::Por, Language::Portuguese),
    (Lang::Deu, Language::German),
    (Lang::Ita, Language::Italian),
    (Lang::Rus, Language::Russian),
    (Lang::Jpn, Language::Japanese),
    (Lang::Kor, Language::Korean),
    (Lang::Vie, Language::Vietnamese),
    (Lang::Tha, Language::Thai),
    (Lang::Ara, Language::Arabic),
    (Lang::Ind, Language::Indonesian),
    (Lang::Tur, Language::Turkish),
    (Lang::Nld, Language::Dutch),
    (Lang::Pol, Language::Polish),
    (Lang::Ukr, Language::Ukrainian),
    (Lang::Ces, Language::Czech),
    (Lang::Heb, Language::Hebrew),
    (Lang::Hin, Language::Hindi),
    (Lang::Ben, Language::Bengali),
    (Lang::Urd, Language::Urdu),
    (Lang::Pes, Language::Persian),
    (Lang::Ell, Language::Greek),
    (Lang::Hun, Language::Hungarian),
    (Lang::Ron, Language::Romanian),
    (Lang::Swe, Language::Swedish),
    (Lang::Tgl, Language::Tagalog),
];

/// whatlang's confidence that makes a detection usable when lingua agrees.
pub const MIN_CONFIDENCE: f64 = 0.5;

/// lingua's confidence that makes a detection usable when whatlang agrees.
/// Lower lets more two-word questions through wrongly (on lingua's word-pair
/// test data, agreeing at 0.7: 47 wrong of 20,675 named; at 0.8: 29 of
/// 19,916, fewer than whatlang alone's 32 of 13,728).
pub const MIN_LINGUA_CONFIDENCE: f64 = 0.8;

/// The first characters are enough to tell the language, and lingua's cost
/// grows with the text (about 5 ms for the longest question allowed).
const DETECTED_CHARS: usize = 400;

static WHATLANG: LazyLock<Detector> = LazyLock::new(|| {
    Detector::with_allowlist(QWEN_LANGUAGES.iter().map(|(lang, _)| *lang).collect())
});

static LINGUA: LazyLock<LanguageDetector> = LazyLock::new(|| {
    LanguageDetectorBuilder::from_languages(&QWEN_LANGUAGES.map(|(_, language)| language)).build()
});

/// The question's language as an English name (what the worker's prompt
/// says: "Answer in Spanish"), or `None` when the guess is not confident.
pub fn detect(text: &str) -> Option<&'static str> {
    let text = match text.char_indices().nth(DETECTED_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    };
    let whatlang = WHATLANG.detect(text)?;
    let (language, confidence) = LINGUA
        .compute_language_confidence_values(text)
        .into_iter()
        .next()?;
    let agree = QWEN_LANGUAGES.contains(&(whatlang.lang(), language));
    let sure = whatlang.confidence() >= MIN_CONFIDENCE || confidence >= MIN_LINGUA_CONFIDENCE;
    (agree && sure).then(|| name(whatlang.lang()))
}

/// A bounded label for metrics: a known language's name, else `other`
/// (client-given languages are free text and must not become label values).
pub fn metric_label(language: Option<&str>) -> &'static str {
    let Some(language) = language else {
        return "unknown";
    };
    QWEN_LANGUAGES
        .iter()
        .map(|(lang, _)| name(*lang))
        .find(|known| known.eq_ignore_ascii_case(language))
        .or_else(|| {
            let lang = Lang::from_code(language.to_ascii_lowercase())?;
            QWEN_LANGUAGES
                .iter()
                .any(|(known, _)| *known == lang)
                .then(|| name(lang))
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
mod tests;
