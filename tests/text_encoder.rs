//! The text encoder (multilingual-e5-small on ONNX Runtime, its own
//! tokenizer): for 20 English and 20 Chinese sentences, a paraphrase scores
//! above an unrelated sentence of the same language. Each pair's margin
//! (paraphrase cosine minus the unrelated one) and the smallest per language
//! are printed; every margin must be positive. Needs `scripts/models`.

use onair::models::text::{cosine, TextEncoder};

/// (sentence, paraphrase, unrelated) in the language of live-room chat.
const ENGLISH: [(&str, &str, &str); 20] = [
    (
        "That was an amazing play",
        "What an incredible move that was",
        "I need to buy groceries tomorrow",
    ),
    (
        "Thanks for the gift",
        "Thank you so much for the present",
        "The train leaves at seven",
    ),
    (
        "This game is so hard",
        "This level is really difficult",
        "My cat likes to sleep on the sofa",
    ),
    (
        "Can you show your settings?",
        "Please share your configuration",
        "It rained all day yesterday",
    ),
    (
        "I just followed you",
        "I'm now following your channel",
        "The soup needs more salt",
    ),
    (
        "The stream is lagging",
        "The video keeps freezing",
        "She painted the fence blue",
    ),
    (
        "Clip that right now",
        "Someone save that moment",
        "Bananas are rich in potassium",
    ),
    (
        "Good morning everyone",
        "Hello all, have a nice morning",
        "The engine needs new oil",
    ),
    (
        "What song is playing?",
        "What's the name of this music?",
        "He broke his leg skiing",
    ),
    (
        "You are the best streamer",
        "Nobody streams better than you",
        "The library closes at noon",
    ),
    (
        "Let's go team!",
        "Come on, we can win this!",
        "Turn left at the second light",
    ),
    (
        "I'm new here",
        "This is my first time in this stream",
        "The cake is in the oven",
    ),
    (
        "When is the next stream?",
        "What time do you go live again?",
        "Penguins cannot fly",
    ),
    (
        "The sound is too quiet",
        "I can barely hear the audio",
        "We planted tomatoes in May",
    ),
    (
        "That was so funny",
        "I laughed so hard at that",
        "The bridge was built in 1890",
    ),
    (
        "Please say hi to me",
        "Can you greet me, please?",
        "The printer is out of paper",
    ),
    (
        "He is cheating",
        "That player is using hacks",
        "Coffee grows in Brazil",
    ),
    (
        "I have to go now, bye",
        "Sorry, I need to leave, goodbye",
        "The river froze last winter",
    ),
    (
        "Your camera is blurry",
        "The webcam image is out of focus",
        "I prefer tea to juice",
    ),
    (
        "This is my favourite channel",
        "I love this channel more than any other",
        "The meeting was moved to Friday",
    ),
];

const CHINESE: [(&str, &str, &str); 20] = [
    ("这波操作太秀了", "刚才这一下真厉害", "明天我要去超市买菜"),
    ("谢谢主播的礼物", "感谢你送的礼物", "火车七点出发"),
    (
        "这个关卡太难了",
        "这一关真的很难打",
        "我的猫喜欢在沙发上睡觉",
    ),
    (
        "能看看你的设置吗",
        "可以分享一下你的配置吗",
        "昨天下了一整天的雨",
    ),
    ("我刚关注了你", "我已经关注你的频道了", "这汤需要多放点盐"),
    ("直播好卡啊", "画面一直卡顿", "她把篱笆刷成了蓝色"),
    ("快截图", "赶紧把这一刻录下来", "香蕉富含钾"),
    ("大家早上好", "各位早安", "发动机需要换机油了"),
    ("现在放的是什么歌", "这首音乐叫什么名字", "他滑雪摔断了腿"),
    ("你是最好的主播", "没有人比你播得更好", "图书馆中午关门"),
    ("加油加油", "冲啊，我们能赢", "在第二个红绿灯左转"),
    ("我是新来的", "第一次来这个直播间", "蛋糕在烤箱里"),
    ("下次什么时候开播", "你什么时候再直播", "企鹅不会飞"),
    ("声音太小了", "我几乎听不到声音", "我们五月种了西红柿"),
    ("笑死我了", "这个太好笑了", "这座桥建于1890年"),
    ("跟我打个招呼吧", "能和我说声你好吗", "打印机没纸了"),
    ("他开挂了", "那个玩家在用外挂", "巴西出产咖啡"),
    (
        "我要走了，拜拜",
        "不好意思我得下线了，再见",
        "去年冬天河面结冰了",
    ),
    ("你的镜头好模糊", "摄像头的画面不清楚", "比起果汁我更喜欢茶"),
    ("这是我最喜欢的频道", "我最爱这个频道", "会议改到周五了"),
];

fn margins(enc: &mut TextEncoder, set: &[(&str, &str, &str)]) -> Vec<f32> {
    let mut texts = Vec::new();
    for (a, b, c) in set {
        texts.extend([*a, *b, *c]);
    }
    let e = enc.embed(&texts).expect("embed");
    let row = |i: usize| &e[i * TextEncoder::DIM..(i + 1) * TextEncoder::DIM];
    (0..set.len())
        .map(|k| {
            let (a, b, c) = (row(3 * k), row(3 * k + 1), row(3 * k + 2));
            cosine(a, b) - cosine(a, c)
        })
        .collect()
}

#[test]
fn paraphrases_score_above_unrelated_sentences() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut enc = TextEncoder::load(
        &root.join("models/text/1/model.onnx"),
        &root.join("models/text/1/tokenizer.json"),
        1,
    )
    .expect("text encoder (run scripts/models)");
    // Unit length, and a text alone embeds as it does in a batch.
    let one = enc.embed(&["hello"]).expect("embed");
    let norm: f32 = one.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    for (name, set) in [("English", &ENGLISH[..]), ("Chinese", &CHINESE[..])] {
        let m = margins(&mut enc, set);
        let min = m.iter().copied().fold(f32::INFINITY, f32::min);
        let mean = m.iter().sum::<f32>() / m.len() as f32;
        println!("{name}: margins {m:.3?}; min {min:.3}, mean {mean:.3}");
        for (k, v) in m.iter().enumerate() {
            assert!(
                *v > 0.0,
                "{name} pair {k} {:?}: paraphrase not above unrelated ({v:.3})",
                set[k]
            );
        }
    }
    // A cross-language paraphrase is closer than an unrelated sentence.
    let e = enc
        .embed(&["Thanks for the gift", "谢谢你的礼物", "火车七点出发"])
        .expect("embed");
    let d = TextEncoder::DIM;
    let (en, zh, other) = (&e[..d], &e[d..2 * d], &e[2 * d..]);
    assert!(cosine(en, zh) > cosine(en, other));
    assert!(enc.embed(&[]).expect("empty").is_empty());
}

/// A text's embedding is the same to the last bit whatever it runs with:
/// alone, first or last in a batch, beside longer texts (more padding),
/// and with one or two threads. Replays after a restart batch comments
/// differently from the first run; their records must not differ.
#[test]
fn an_embedding_does_not_depend_on_its_batch() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let x = "这波操作太秀了 what a play";
    let mut seen: Option<Vec<f32>> = None;
    for threads in [1, 2] {
        let mut enc = TextEncoder::load(
            &root.join("models/text/1/model.onnx"),
            &root.join("models/text/1/tokenizer.json"),
            threads,
        )
        .expect("text encoder (run scripts/models)");
        let d = TextEncoder::DIM;
        let long = "a much longer comment, with many more words in it than the one we embed";
        let mut batch = vec!["gg"; 17];
        batch[9] = x;
        let runs: Vec<(&str, Vec<f32>)> = vec![
            ("alone", enc.embed(&[x]).expect("embed")),
            (
                "first of two",
                enc.embed(&[x, "gg"]).expect("embed")[..d].to_vec(),
            ),
            (
                "beside a longer text",
                enc.embed(&[long, x]).expect("embed")[d..].to_vec(),
            ),
            (
                "10th of 17",
                enc.embed(&batch).expect("embed")[9 * d..10 * d].to_vec(),
            ),
        ];
        for (how, e) in runs {
            let want = seen.get_or_insert_with(|| e.clone());
            let same = e
                .iter()
                .zip(want.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{how}, {threads} threads: other bits than the first run"
            );
        }
    }
}
