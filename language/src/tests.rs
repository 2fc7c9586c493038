//! Detection on the questions students ask: one-liners, 4 to 12 words,
//! in each language Qwen2.5 answers well.

use super::*;

/// language<TAB>question, with a header line.
const SHORT_QUESTIONS: &str = include_str!("../tests/data/short_questions.tsv");

fn short_questions() -> Vec<(&'static str, &'static str)> {
    SHORT_QUESTIONS
        .lines()
        .skip(1)
        .map(|line| line.split_once('\t').expect("language<TAB>question"))
        .collect()
}

/// What whatlang alone named before lingua had to agree: the bar to beat.
fn whatlang_alone(text: &str) -> Option<&'static str> {
    let info = WHATLANG.detect(text)?;
    (info.confidence() >= MIN_CONFIDENCE).then(|| name(info.lang()))
}

#[test]
fn the_set_covers_every_language() {
    let questions = short_questions();
    for (lang, _) in QWEN_LANGUAGES {
        let count = questions
            .iter()
            .filter(|(language, _)| *language == name(lang))
            .count();
        assert!(count >= 2, "{} has {count} questions", name(lang));
    }
    assert_eq!(
        questions.len(),
        questions
            .iter()
            .filter(|(l, _)| metric_label(Some(l)) == *l)
            .count(),
        "every language in the set is one of the 29, spelled as detect names it"
    );
}

#[test]
fn short_questions_are_named_more_often_and_never_wrongly() {
    let questions = short_questions();
    let mut named = 0;
    let mut wrong = Vec::new();
    for (language, question) in &questions {
        match detect(question) {
            Some(detected) if detected == *language => named += 1,
            Some(detected) => wrong.push(format!("{language} read as {detected}: {question}")),
            None => {}
        }
    }
    let named_alone = questions
        .iter()
        .filter(|(language, question)| whatlang_alone(question) == Some(*language))
        .count();
    println!(
        "of {} short questions: named {named} (whatlang alone {named_alone})",
        questions.len()
    );
    assert!(wrong.is_empty(), "wrong languages: {wrong:#?}");
    assert!(
        named >= named_alone,
        "named {named}, whatlang alone {named_alone}"
    );
}

#[test]
fn detects_the_four_test_languages() {
    let cases = [
        (
            "Why does the moon change its shape during the month?",
            "English",
        ),
        ("Explain the French revolution", "English"),
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
    assert_eq!(detect("2 + 2 = ?"), None);
    assert_eq!(detect("How do I solve 2x + 3 = 7?"), None);
    // lingua reads it as English (0.52), whatlang too (0.04): neither is sure.
    assert_eq!(detect("Was ist Photosynthese?"), None);
    // lingua: English, whatlang: Spanish; both wrong, so they disagree.
    assert_eq!(detect("c quoi la photosynthese"), None);
}

#[test]
fn only_the_first_characters_are_read() {
    let long = "¿Por qué la luna cambia de forma durante el mes? ".repeat(100);
    assert_eq!(detect(&long), Some("Spanish"));
}

#[test]
fn metric_labels_are_bounded() {
    assert_eq!(metric_label(Some("spanish")), "Spanish");
    assert_eq!(metric_label(Some("spa")), "Spanish");
    assert_eq!(metric_label(Some("Klingon <script>")), "other");
    assert_eq!(metric_label(None), "unknown");
}
