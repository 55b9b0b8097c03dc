//! Client topics, filters and the upstream layout, on arbitrary text: the first line is a
//! topic (or subscription, or upstream topic, or prefix), the other lines are filter values
//! or load-balance groups. Checks, for every scope and layout, that parsing agrees with
//! itself, that a publish topic maps to upstream and back, that upstream topics parse back to
//! what they were built from, and that subscription filters stay in their namespace.

#![no_main]

use cuttle::topic::filters::{self, FilterItem};
use cuttle::topic::upstream::TopicLayout;
use cuttle::topic::{ClientFilter, ClientTopic};
use cuttle_fuzz::{
    SCOPES, check_client_filter, check_client_topic, check_filter_level, check_publish,
    check_subscription,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let values: Vec<&str> = lines.collect();
    let layouts = [
        TopicLayout::default(),
        cuttle_fuzz::WORLD.layouts[1].clone(),
    ];

    // Filter values and groups alone.
    for v in &values {
        let _ = filters::check_group(v);
        // Made-safe identifiers carry nothing MQTT reserves (the length limit still applies).
        let encoded = filters::encode_group(v);
        if encoded.len() <= filters::MAX_FILTER_BYTES {
            assert!(
                filters::check_group(&encoded).is_ok(),
                "{v:?} -> {encoded:?}"
            );
        }
    }
    let mut items: Vec<FilterItem> = values
        .iter()
        .map(|v| FilterItem::One(v.to_string()))
        .collect();
    items.push(FilterItem::All(
        values.iter().map(|v| v.to_string()).collect(),
    ));
    let sub = filters::subscription_filters(&items).ok();
    for level in sub.iter().flatten() {
        check_filter_level(level);
    }
    let owned: Vec<String> = values.iter().skip(1).map(|v| v.to_string()).collect();
    let publish_filter = filters::publish_filter(values.first().copied(), &owned)
        .ok()
        .flatten();
    if let Some(f) = &publish_filter {
        assert!(!f.is_empty() && !f.contains(['/', '+', '#']), "{f:?}");
    }

    // The first line as a publish topic and as a subscription.
    if let Ok(topic) = ClientTopic::parse(first) {
        check_client_topic(first, topic);
        for layout in &layouts {
            for scope in SCOPES {
                check_publish(layout, scope, topic, None);
                check_publish(layout, scope, topic, publish_filter.as_deref());
            }
        }
    }
    if let Ok(filter) = ClientFilter::parse(first) {
        check_client_filter(first, &filter);
        let sub = sub.as_deref().unwrap_or_default();
        let group = values
            .last()
            .copied()
            .filter(|g| filters::check_group(g).is_ok());
        for layout in &layouts {
            for scope in SCOPES {
                for share in [None, group] {
                    check_subscription(layout, scope, &filter, &[], share);
                    check_subscription(layout, scope, &filter, sub, share);
                }
            }
        }
    }

    // The first line as a topic arriving from the broker: taken apart, it rebuilds exactly.
    for layout in &layouts {
        if let Some(up) = layout.parse_upstream(first) {
            assert_eq!(
                layout.publish_topic(up.scope, up.client_topic(), up.filter),
                first,
                "{up:?}"
            );
        }
    }

    // The first line as a configured topic prefix.
    if let Ok(layout) = TopicLayout::new(first) {
        assert_eq!(layout.prefix(), first);
        let topic = ClientTopic::parse("chat/general/messages").unwrap_or_else(|e| panic!("{e}"));
        for scope in SCOPES {
            check_publish(&layout, scope, topic, None);
        }
    }
});
