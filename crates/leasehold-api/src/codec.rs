//! The API's codec: protobuf via prost, refusing messages with fields this version does not
//! know. prost drops unknown fields silently; a request from a newer client that sets one
//! (say, a new safety flag) would otherwise be obeyed only in part.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// A prost codec whose decoder refuses unknown fields. Used by the generated client and server.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// Decodes `U`, refusing bytes that do not belong to a field `U` knows.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use prost::bytes::Buf;
        let received = buf.remaining();
        let item = U::decode(buf)
            .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))?;
        check_known(received, &item)?;
        Ok(Some(item))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A message re-encodes to exactly the bytes received unless some of them were fields it does
/// not know (encoders of proto3 never send default scalars, so canonical input round-trips).
fn check_known<U: Message>(received: usize, item: &U) -> Result<(), Status> {
    let known = item.encoded_len();
    if known < received {
        return Err(Status::invalid_argument(format!(
            "the message holds {} bytes of fields this agent does not know; is the client newer than the agent?",
            received - known
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn unknown_fields_are_refused_known_ones_pass() {
        let req = pb::ValidateRequest {
            resource: "disk".into(),
            token: 5,
        };
        let mut bytes = req.encode_to_vec();
        let back = pb::ValidateRequest::decode(bytes.as_slice()).unwrap();
        assert!(check_known(bytes.len(), &back).is_ok());
        // Field 99, varint 1: unknown to ValidateRequest.
        bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
        let back = pb::ValidateRequest::decode(bytes.as_slice()).unwrap();
        let e = check_known(bytes.len(), &back).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("3 bytes"), "{}", e.message());
    }
}
