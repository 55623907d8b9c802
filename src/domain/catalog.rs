//! The event catalog: built-in learning-platform events plus those added in
//! config. Each type is delivered in real time or in batches.

use crate::config::{EventTypeConfig, ModeConfig};

/// How events of a type are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Sent as soon as possible.
    Realtime,
    /// Sent every batch interval, or when a full payload is pending.
    Batch,
}

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType {
    /// Name used by events and subscriptions.
    pub name: String,
    /// Real-time or batch.
    pub mode: Mode,
    /// What it means.
    pub description: String,
}

const REALTIME: &[(&str, &str)] = &[
    (
        "CI_STATS",
        "Continuing-education statistics of a learner changed.",
    ),
    ("COURSE_ENROLLMENT", "A learner was enrolled in a course."),
    (
        "LEARNING_PATH_ENROLLMENT",
        "A learner was enrolled in a learning path.",
    ),
    (
        "CERTIFICATION_ENROLLMENT",
        "A learner was enrolled in a certification.",
    ),
    ("COURSE_COMPLETED", "A learner completed a course."),
    (
        "LEARNING_PATH_COMPLETED",
        "A learner completed a learning path.",
    ),
    (
        "CERTIFICATION_COMPLETED",
        "A learner completed a certification.",
    ),
    (
        "COURSE_UNENROLLMENT",
        "A learner was unenrolled from a course.",
    ),
    (
        "LEARNING_PATH_UNENROLLMENT",
        "A learner was unenrolled from a learning path.",
    ),
    (
        "CERTIFICATION_UNENROLLMENT",
        "A learner was unenrolled from a certification.",
    ),
    (
        "LEARNING_OBJECT_DRAFT",
        "A learning object was saved as a draft.",
    ),
    (
        "LEARNING_OBJECT_MODIFICATION",
        "A learning object was modified.",
    ),
    ("LEARNING_OBJECT_DELETION", "A learning object was deleted."),
    (
        "LEARNING_OBJECT_INSTANCE_MODIFICATION",
        "An instance of a learning object was modified.",
    ),
    (
        "LEARNING_OBJECT_INSTANCE_DELETION",
        "An instance of a learning object was deleted.",
    ),
    (
        "LEARNING_PATH_COMPLETION_ROLLBACK",
        "A learning-path completion was rolled back.",
    ),
];

const BATCH: &[(&str, &str)] = &[
    (
        "COURSE_ENROLLMENT_BATCH",
        "Course enrollments, sent in batches.",
    ),
    (
        "LEARNING_PATH_ENROLLMENT_BATCH",
        "Learning-path enrollments, sent in batches.",
    ),
    (
        "CERTIFICATION_ENROLLMENT_BATCH",
        "Certification enrollments, sent in batches.",
    ),
    (
        "COURSE_COMPLETED_BATCH",
        "Course completions, sent in batches.",
    ),
    (
        "LEARNING_PATH_COMPLETED_BATCH",
        "Learning-path completions, sent in batches.",
    ),
    (
        "CERTIFICATION_COMPLETED_BATCH",
        "Certification completions, sent in batches.",
    ),
    (
        "COURSE_UNENROLLMENT_BATCH",
        "Course unenrollments, sent in batches.",
    ),
    (
        "LEARNING_PATH_UNENROLLMENT_BATCH",
        "Learning-path unenrollments, sent in batches.",
    ),
    (
        "CERTIFICATION_UNENROLLMENT_BATCH",
        "Certification unenrollments, sent in batches.",
    ),
    (
        "LEARNING_OBJECT_MODIFICATION_BATCH",
        "Learning-object modifications, sent in batches.",
    ),
    (
        "LEARNING_OBJECT_INSTANCE_MODIFICATION_BATCH",
        "Learning-object instance modifications, sent in batches.",
    ),
    (
        "LEARNING_PATH_COMPLETION_ROLLBACK_BATCH",
        "Learning-path completion rollbacks, sent in batches.",
    ),
    (
        "LEARNER_PROGRESS",
        "Learner progress updates, sent in batches.",
    ),
];

/// Mode of a built-in event type, if `name` is one.
pub fn builtin_mode(name: &str) -> Option<Mode> {
    if REALTIME.iter().any(|(n, _)| *n == name) {
        Some(Mode::Realtime)
    } else if BATCH.iter().any(|(n, _)| *n == name) {
        Some(Mode::Batch)
    } else {
        None
    }
}

/// The catalog in force: built-in entries, then the configured ones.
#[derive(Debug, Clone)]
pub struct Catalog {
    entries: Vec<EventType>,
}

impl Catalog {
    /// Built-in types plus `extra` (already validated by config).
    pub fn new(extra: &[EventTypeConfig]) -> Catalog {
        let builtin = REALTIME
            .iter()
            .map(|(n, d)| (n, d, Mode::Realtime))
            .chain(BATCH.iter().map(|(n, d)| (n, d, Mode::Batch)))
            .map(|(n, d, mode)| EventType {
                name: n.to_string(),
                mode,
                description: d.to_string(),
            });
        let configured = extra.iter().map(|e| EventType {
            name: e.name.clone(),
            mode: match e.mode {
                ModeConfig::Realtime => Mode::Realtime,
                ModeConfig::Batch => Mode::Batch,
            },
            description: e.description.clone(),
        });
        Catalog {
            entries: builtin.chain(configured).collect(),
        }
    }

    /// Every entry, in catalog order.
    pub fn entries(&self) -> &[EventType] {
        &self.entries
    }

    /// Mode of `name`, or None when it is not in the catalog. The internal
    /// (operational) types are not: nothing may publish or subscribe to
    /// them through the API, see [`Catalog::lane_mode`].
    pub fn mode(&self, name: &str) -> Option<Mode> {
        self.entries.iter().find(|e| e.name == name).map(|e| e.mode)
    }

    /// Mode of `name` for the delivery lanes: the catalog's, or real-time
    /// for the router's own operational types (internal entries of the
    /// catalog, delivered only to the operator endpoint; see
    /// `domain::operational`).
    pub fn lane_mode(&self, name: &str) -> Option<Mode> {
        self.mode(name)
            .or_else(|| Self::is_internal(name).then_some(Mode::Realtime))
    }

    /// Whether `name` is an internal type: an operational event of the
    /// router, never published or subscribed to through the API.
    pub fn is_internal(name: &str) -> bool {
        crate::domain::operational::is_operational(name)
    }

    /// The catalog name `name` was probably meant as: the same name in
    /// another case, else the closest by edit distance when it is close
    /// (at most 2 edits, or a quarter of the name's length).
    pub fn suggest(&self, name: &str) -> Option<&str> {
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(name))
        {
            return Some(&e.name);
        }
        // Names are at most 64 characters; anything much longer is no typo.
        if name.is_empty() || name.chars().count() > 80 {
            return None;
        }
        let wanted: Vec<char> = name.to_ascii_uppercase().chars().collect();
        let (distance, best) = self
            .entries
            .iter()
            .map(|e| (edit_distance(&wanted, &e.name), e.name.as_str()))
            .min_by_key(|(d, _)| *d)?;
        (distance <= 2.max(wanted.len() / 4)).then_some(best)
    }

    /// Why `name` is refused: unknown, with a suggestion when there is one.
    pub fn unknown_type_reason(&self, name: &str) -> String {
        let shown = crate::domain::webhook::truncate(name, 80);
        if Self::is_internal(name) {
            return format!(
                "{shown:?} is an operational event of the router itself; it cannot be \
                 published or subscribed to (see [operational] and WatchOperationalEvents)"
            );
        }
        match self.suggest(name) {
            Some(s) => {
                format!("unknown event type {shown:?}; did you mean {s}? (see ListEventTypes)")
            }
            None => format!("unknown event type {shown:?} (see ListEventTypes)"),
        }
    }
}

/// Levenshtein distance between `a` and `b` (compared as characters).
fn edit_distance(a: &[char], b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_both_modes() {
        let c = Catalog::new(&[]);
        assert_eq!(c.entries().len(), 29);
        assert_eq!(c.mode("COURSE_ENROLLMENT"), Some(Mode::Realtime));
        assert_eq!(c.mode("LEARNER_PROGRESS"), Some(Mode::Batch));
        assert_eq!(c.mode("NOPE"), None);
        // Internal types: only for the lanes.
        assert_eq!(c.mode("delivery.dead"), None);
        assert_eq!(c.lane_mode("delivery.dead"), Some(Mode::Realtime));
        assert_eq!(c.lane_mode("COURSE_ENROLLMENT"), Some(Mode::Realtime));
        assert!(c
            .unknown_type_reason("webhook.created")
            .contains("operational"));
    }

    #[test]
    fn configured_types_are_appended() {
        let c = Catalog::new(&[EventTypeConfig {
            name: "BADGE_AWARDED".into(),
            mode: ModeConfig::Batch,
            description: "x".into(),
        }]);
        assert_eq!(c.entries().last().unwrap().name, "BADGE_AWARDED");
        assert_eq!(c.mode("BADGE_AWARDED"), Some(Mode::Batch));
    }

    #[test]
    fn unknown_names_get_the_closest_catalog_name() {
        let c = Catalog::new(&[]);
        assert_eq!(c.suggest("course_enrollment"), Some("COURSE_ENROLLMENT"));
        assert_eq!(c.suggest("Course_Completed"), Some("COURSE_COMPLETED"));
        assert_eq!(c.suggest("COURSE_ENROLMENT"), Some("COURSE_ENROLLMENT"));
        assert_eq!(c.suggest("COURSE-ENROLLMENT"), Some("COURSE_ENROLLMENT"));
        assert_eq!(c.suggest("NO_SUCH_TYPE"), None);
        assert_eq!(c.suggest(""), None);
        assert_eq!(
            c.unknown_type_reason("course_enrollment"),
            "unknown event type \"course_enrollment\"; did you mean COURSE_ENROLLMENT? \
             (see ListEventTypes)"
        );
        assert_eq!(
            c.unknown_type_reason("NOPE"),
            "unknown event type \"NOPE\" (see ListEventTypes)"
        );
    }
}
