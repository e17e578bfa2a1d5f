//! Hands a small answer's bytes to HTTP/2 in DATA frames below h2's chaining
//! threshold, so that the answer, its trailers and the answers of other calls
//! on the connection leave in one socket write instead of one write each.
//!
//! Why: h2 (0.4, `codec/framed_write.rs`) copies a DATA frame into its 16 KiB
//! write buffer only when the payload is under 256 bytes (1,024 without
//! vectored I/O); a larger payload is *chained* — kept aside and written from
//! its own buffer — and nothing else may be buffered until that write is done.
//! So a 1–2 KB lookup answer costs a `writev` for its headers and data and
//! another for its 10-byte trailers, and answers of concurrent calls never
//! share a write. Split into pieces under the threshold, the same bytes are
//! copied into the buffer with everything else and flushed together: one write
//! for many answers under load, one per answer alone (the profile in
//! BENCHMARKS.md §9). Answers above [`LARGEST_ANSWER_SPLIT`] pass unchanged:
//! for them one chained write beats many frame headers and copies.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::TryFutureExt;
use futures::future::MapOk;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::Bytes;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

/// The largest DATA frame handed to h2: under its chaining threshold of 256
/// bytes (with vectored I/O; 1,024 without), so it is always copied.
pub(crate) const LARGEST_FRAME: usize = 255;

/// Data chunks up to this size are split; larger ones go out as they come.
/// A detail answer is 1–2 KB; a page of refunds can be tens of KB.
pub(crate) const LARGEST_ANSWER_SPLIT: usize = 4 * 1024;

/// Wraps every response body of the server in [`SmallFramesBody`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SmallFramesLayer;

impl<S> Layer<S> for SmallFramesLayer {
    type Service = SmallFramesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SmallFramesService { inner }
    }
}

/// See [`SmallFramesLayer`].
#[derive(Clone, Debug)]
pub(crate) struct SmallFramesService<S> {
    inner: S,
}

type WrapBody<B> = fn(Response<B>) -> Response<SmallFramesBody<B>>;

impl<S, RequestBody, ResponseBody> Service<Request<RequestBody>> for SmallFramesService<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResponseBody>>,
{
    type Response = Response<SmallFramesBody<ResponseBody>>;
    type Error = S::Error;
    type Future = MapOk<S::Future, WrapBody<ResponseBody>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let wrap: WrapBody<ResponseBody> = |response| response.map(SmallFramesBody::new);
        self.inner.call(request).map_ok(wrap)
    }
}

/// A response body whose data chunks of at most [`LARGEST_ANSWER_SPLIT`] bytes
/// come out as frames of at most [`LARGEST_FRAME`] bytes (zero-copy slices of
/// the chunk); trailers and larger chunks pass unchanged.
#[derive(Debug)]
pub(crate) struct SmallFramesBody<B> {
    inner: B,
    /// What is left of the chunk being split.
    rest: Bytes,
}

impl<B> SmallFramesBody<B> {
    fn new(inner: B) -> Self {
        SmallFramesBody {
            inner,
            rest: Bytes::new(),
        }
    }

    fn next_piece(&mut self) -> Bytes {
        let length = self.rest.len().min(LARGEST_FRAME);
        self.rest.split_to(length)
    }
}

impl<B> Body for SmallFramesBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.next_piece()))));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(context)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        match frame.into_data() {
            Ok(data) if data.len() > LARGEST_FRAME && data.len() <= LARGEST_ANSWER_SPLIT => {
                this.rest = data;
                Poll::Ready(Some(Ok(Frame::data(this.next_piece()))))
            }
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(not_data) => Poll::Ready(Some(Ok(not_data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use tonic::codegen::http::{HeaderMap, HeaderValue};

    use super::*;

    /// A body that hands out the frames it was given, one per poll.
    struct GivenFrames(VecDeque<Frame<Bytes>>);

    impl Body for GivenFrames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _context: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn grpc_trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers
    }

    /// Every frame the wrapped body yields: data lengths, then `None` for trailers.
    async fn frames_of(chunks: Vec<Bytes>) -> (Vec<Option<usize>>, Bytes, bool) {
        let mut given: VecDeque<Frame<Bytes>> = chunks.into_iter().map(Frame::data).collect();
        given.push_back(Frame::trailers(grpc_trailers()));
        let mut body = SmallFramesBody::new(GivenFrames(given));
        let mut shapes = Vec::new();
        let mut all_data = Vec::new();
        let mut trailers_seen = false;
        while let Some(frame) =
            std::future::poll_fn(|context| Pin::new(&mut body).poll_frame(context)).await
        {
            let frame = frame.expect("the given body never fails");
            match frame.into_data() {
                Ok(data) => {
                    assert!(!trailers_seen, "data after the trailers");
                    shapes.push(Some(data.len()));
                    all_data.extend_from_slice(&data);
                }
                Err(frame) => {
                    assert_eq!(frame.into_trailers().ok(), Some(grpc_trailers()));
                    trailers_seen = true;
                    shapes.push(None);
                }
            }
        }
        assert!(body.is_end_stream());
        (shapes, Bytes::from(all_data), trailers_seen)
    }

    fn numbered_bytes(length: usize) -> Bytes {
        (0..length)
            .map(|index| (index % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    #[tokio::test]
    async fn an_answer_under_the_split_limit_comes_out_in_frames_h2_copies_with_every_byte_in_order()
     {
        let answer = numbered_bytes(1_000);
        let (shapes, data, trailers_seen) = frames_of(vec![answer.clone()]).await;
        assert_eq!(
            shapes,
            vec![Some(255), Some(255), Some(255), Some(235), None]
        );
        assert_eq!(data, answer);
        assert!(trailers_seen);
    }

    #[tokio::test]
    async fn small_answers_and_answers_above_the_split_limit_pass_unchanged() {
        let small = numbered_bytes(LARGEST_FRAME);
        let large = numbered_bytes(LARGEST_ANSWER_SPLIT + 1);
        let (shapes, data, _) = frames_of(vec![small.clone(), large.clone()]).await;
        assert_eq!(
            shapes,
            vec![Some(LARGEST_FRAME), Some(LARGEST_ANSWER_SPLIT + 1), None]
        );
        assert_eq!(data, [small, large].concat());
    }

    #[tokio::test]
    async fn a_stream_of_chunks_is_split_chunk_by_chunk_and_ends_only_after_the_last_piece() {
        let chunks = vec![numbered_bytes(300), numbered_bytes(LARGEST_ANSWER_SPLIT)];
        let (shapes, data, _) = frames_of(chunks.clone()).await;
        let mut expected = vec![Some(255), Some(45)];
        expected.extend(std::iter::repeat_n(Some(255), LARGEST_ANSWER_SPLIT / 255));
        expected.push(Some(LARGEST_ANSWER_SPLIT % 255));
        expected.push(None);
        assert_eq!(shapes, expected);
        assert_eq!(data, chunks.concat());
    }

    #[test]
    fn the_size_hint_counts_the_piece_still_held() {
        let mut body = SmallFramesBody::new(GivenFrames(VecDeque::new()));
        body.rest = numbered_bytes(700);
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().lower(), 700);
        assert_eq!(body.next_piece().len(), 255);
        assert_eq!(body.size_hint().lower(), 445);
    }
}
