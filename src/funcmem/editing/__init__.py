"""The image-editing application of funcmem: edit operators, photo data, base editor, benchmark."""
