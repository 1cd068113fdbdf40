//! The matrix picture looked at in a real browser: headless Chromium renders the HTML page of
//! the example manifests and takes a screenshot, whose drawing (above the legend) must show the
//! partly allowed and the denied edges in their colours. `MATRIX_SCREENSHOT=PATH` keeps the
//! screenshot: `MATRIX_SCREENSHOT=$PWD/docs/matrix.png cargo test --release -p enforcer --test
//! matrix_picture -- --include-ignored` makes docs/matrix.png.

use std::{path::Path, process::Command};

use enforcer::cli::matrix::{Format, Group, Verdict, color, render, svg_size, view_of_dir};

/// `#rrggbb` as bytes.
fn rgb(hex: &str) -> [u8; 3] {
    let b = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
    [b(1), b(3), b(5)]
}

/// Pixels of `rgba` within 30 of `target` on every channel.
fn count_near(pixels: &[[u8; 3]], target: [u8; 3]) -> usize {
    pixels
        .iter()
        .filter(|p| p.iter().zip(target).all(|(a, b)| a.abs_diff(b) <= 30))
        .count()
}

fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut decoder = png::Decoder::new(file);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bytes = &buf[..info.buffer_size()];
    let step = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    let pixels = bytes
        .chunks_exact(step)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, pixels)
}

#[test]
#[ignore = "needs chromium (cargo xtask setup installs it)"]
fn the_matrix_page_shows_allowed_and_denied_edges_in_chromium() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut view = view_of_dir(&examples, Group::Pod).unwrap();
    view.title = "Who can talk to whom: manifests/examples".into();
    let verdicts: Vec<Verdict> = view.edges.iter().map(|e| e.verdict()).collect();
    assert!(
        verdicts.contains(&Verdict::Partial) && verdicts.contains(&Verdict::Denied),
        "frontend to backend on one of two ports, every other pair denied: {verdicts:?}"
    );
    let svg = render(&view, Format::Svg).unwrap();
    let (svg_w, svg_h) = svg_size(&svg);
    // The legend's box: the drawing is above it.
    let legend_top: u32 = svg
        .lines()
        .find(|l| l.contains("stroke=\"#d0d7de\""))
        .and_then(|l| l.split_once(" y=\""))
        .and_then(|(_, r)| r.split_once('"'))
        .map(|(y, _)| y.parse::<f64>().unwrap() as u32)
        .unwrap();
    let rows = u32::try_from(view.nodes.len()).unwrap() + 1;
    let (win_w, win_h) = (svg_w + 40, svg_h + 60 + 44 * rows);
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("matrix.html");
    std::fs::write(&page, render(&view, Format::Html).unwrap()).unwrap();
    let profile = tmp.path().join("profile");
    std::fs::create_dir(&profile).unwrap();
    let shot = tmp.path().join("matrix.png");
    let out = Command::new("timeout")
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--window-size={win_w},{win_h}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium (cargo xtask setup installs it)");
    assert!(
        shot.exists(),
        "no screenshot: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (w, h, pixels) = decode(&shot);
    assert_eq!((w, h), (win_w, win_h));
    // The page's body margin is 16 pixels.
    let drawing = &pixels[..(16 + legend_top as usize) * w as usize];
    let partial = count_near(drawing, rgb(color(Verdict::Partial)));
    let denied = count_near(drawing, rgb(color(Verdict::Denied)));
    let white = count_near(&pixels, [255, 255, 255]);
    assert!(
        partial > 150 && denied > 300,
        "partial-coloured pixels {partial}, denied-coloured {denied}"
    );
    assert!(
        white < pixels.len() * 98 / 100,
        "the page is nearly blank: {white} of {} white",
        pixels.len()
    );
    if let Ok(keep) = std::env::var("MATRIX_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
