//! Opening a payload held in memory as an FFmpeg input, and reading its
//! packets with every error counted (FFmpeg's own packet iterator stops
//! silently on I/O errors, which hides truncation).
//!
//! Not for: decoding packets (see `video` and `audio`).

use std::io::Cursor;

use ffmpeg_next::format::context::{Input, StreamIo};
use ffmpeg_next::{Error as FfError, Packet};

use super::{init, input_error, Deadline, MediaError};

/// Containers onair reads, with the names FFmpeg's probe gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    /// MPEG transport stream.
    MpegTs,
    /// (Fragmented) MP4.
    Mp4,
    /// A single JPEG picture.
    Jpeg,
    /// AAC in ADTS framing.
    Adts,
}

impl Container {
    fn hint(self) -> &'static str {
        match self {
            Container::MpegTs => "segment.ts",
            Container::Mp4 => "segment.mp4",
            Container::Jpeg => "frame.jpg",
            Container::Adts => "audio.aac",
        }
    }

    /// Whether FFmpeg's detected demuxer is this container.
    fn matches(self, demuxer: &str) -> bool {
        let names: &[&str] = match self {
            Container::MpegTs => &["mpegts"],
            Container::Mp4 => &["mov", "mp4"],
            Container::Jpeg => &["jpeg_pipe", "mjpeg", "image2"],
            Container::Adts => &["aac"],
        };
        demuxer
            .split(',')
            .any(|n| names.iter().any(|want| n.trim() == *want))
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Container::MpegTs => "MPEG-TS",
            Container::Mp4 => "MP4",
            Container::Jpeg => "JPEG",
            Container::Adts => "AAC/ADTS",
        }
    }
}

/// An opened payload.
pub struct Demuxer {
    input: Input,
    deadline: Deadline,
    /// Packets the demuxer could not read (skipped).
    pub bad_packets: usize,
    /// Packets read.
    pub packets: usize,
}

/// Most unreadable packets skipped before a payload counts as corrupt.
const MAX_BAD_PACKETS: usize = 16;

impl Demuxer {
    /// Opens `bytes` as `container`, failing if FFmpeg finds another one.
    pub fn open(
        bytes: Vec<u8>,
        container: Container,
        deadline: Deadline,
    ) -> Result<Self, MediaError> {
        init()?;
        if bytes.is_empty() {
            return Err(MediaError::Empty);
        }
        let io = StreamIo::from_read_seek(Cursor::new(bytes))
            .map_err(|e| MediaError::Library(format!("custom I/O: {e}")))?;
        let input = ffmpeg_next::format::input_from_stream_with_interrupt(
            io,
            Some(container.hint()),
            None,
            move || deadline.passed(),
        )
        .map_err(|e| {
            if deadline.passed() {
                deadline.error()
            } else {
                input_error(&format!("not readable as {}", container.name()), e)
            }
        })?;
        let demuxer = input.format().name().to_string();
        if !container.matches(&demuxer) {
            return Err(MediaError::Corrupt(format!(
                "declared {} but the bytes are {demuxer}",
                container.name()
            )));
        }
        Ok(Demuxer {
            input,
            deadline,
            bad_packets: 0,
            packets: 0,
        })
    }

    /// The input, to find streams.
    pub fn input(&self) -> &Input {
        &self.input
    }

    /// Reads the next packet; `Ok(false)` at the end of the payload.
    pub fn next(&mut self, packet: &mut Packet) -> Result<bool, MediaError> {
        loop {
            self.deadline.check()?;
            // av_read_frame does not release what the packet held: start
            // from an empty one, or every previous packet's buffer leaks
            // (found by the video_payload fuzz target).
            *packet = Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    self.packets += 1;
                    return Ok(true);
                }
                Err(FfError::Eof) => return Ok(false),
                Err(FfError::InvalidData) => {
                    self.bad_packets += 1;
                    if self.bad_packets > MAX_BAD_PACKETS {
                        return Err(MediaError::Corrupt(format!(
                            "over {MAX_BAD_PACKETS} unreadable packets"
                        )));
                    }
                }
                Err(_) if self.deadline.passed() => return Err(self.deadline.error()),
                Err(e) => {
                    return Err(MediaError::Truncated(format!(
                        "reading stopped after {} packets: {e}",
                        self.packets
                    )))
                }
            }
        }
    }
}
