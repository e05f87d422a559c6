/*
 * Decode one rectangle of a JPEG, optionally at a reduced DCT scale, with libjpeg(-turbo).
 *
 * Why this exists: a PS3 step at 3780 needs full-resolution pixels only in a window of
 * about 700 x 700 around the caption's box, but Pillow, simplejpeg and torchvision can only
 * decode whole images. libjpeg-turbo's jpeg_crop_scanline() restricts the inverse DCT,
 * upsampling and colour conversion to the window's columns, jpeg_skip_scanlines() runs only
 * the entropy decoder over the rows above it, and the rows below it are never read.
 *
 * decode_region(data, x0, y0, x1, y1, scale_denom=1) -> (rgb, width, height, left, top)
 *   The rectangle is in the coordinates of the image decoded at 1/scale_denom. libjpeg
 *   widens it to whole iMCU columns, so the result covers columns [left, left + width)
 *   and rows [top, top + height); rgb is width * height * 3 bytes, row-major.
 * Raises ValueError for a corrupt or truncated stream (inside the rows read) and
 * NotImplementedError for colour spaces libjpeg cannot turn into RGB (CMYK, YCCK).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
    int truncated;
} region_error;

static void on_error(j_common_ptr cinfo)
{
    region_error *err = (region_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level)
{
    region_error *err = (region_error *)cinfo->err;
    /* Warnings other than a premature end (e.g. extraneous bytes) are ignored, as Pillow does. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF && !err->truncated) {
        err->truncated = 1;
        (*cinfo->err->format_message)(cinfo, err->message);
    }
}

enum outcome { DECODED, CORRUPT, UNSUPPORTED, EMPTY, NO_MEMORY };

typedef struct {
    const unsigned char *data;
    unsigned long size;
    unsigned int x0, y0, x1, y1, denom;
    unsigned char *pixels;
    JDIMENSION width, height, left, top;
} region_job;

/* Runs without the GIL: touches no Python object. */
static enum outcome decode(region_job *job, region_error *err)
{
    struct jpeg_decompress_struct cinfo;
    unsigned char *volatile pixels = NULL;
    enum outcome result = DECODED;

    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->truncated = 0;
    if (setjmp(err->escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(pixels);
        return CORRUPT;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, job->data, job->size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return UNSUPPORTED;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = job->denom;
    jpeg_start_decompress(&cinfo);

    JDIMENSION x1 = job->x1 < cinfo.output_width ? job->x1 : cinfo.output_width;
    JDIMENSION y1 = job->y1 < cinfo.output_height ? job->y1 : cinfo.output_height;
    if (job->x0 >= x1 || job->y0 >= y1) {
        jpeg_destroy_decompress(&cinfo);
        return EMPTY;
    }
    JDIMENSION left = job->x0, width = x1 - job->x0;
    if (left > 0 || width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &left, &width);
    if (job->y0 > 0)
        jpeg_skip_scanlines(&cinfo, job->y0);

    size_t stride = (size_t)cinfo.output_width * 3;  /* output_width is now the cropped width */
    JDIMENSION rows = y1 - job->y0;
    pixels = malloc(stride * rows);
    if (pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return NO_MEMORY;
    }
    while (cinfo.output_scanline < y1 && !err->truncated) {
        JSAMPROW row = pixels + stride * (cinfo.output_scanline - job->y0);
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (err->truncated)
        result = CORRUPT;
    job->width = cinfo.output_width;
    job->height = rows;
    job->left = left;
    job->top = job->y0;
    jpeg_abort_decompress(&cinfo);  /* the rows below the window are never decoded */
    jpeg_destroy_decompress(&cinfo);
    if (result != DECODED) {
        free(pixels);
        return result;
    }
    job->pixels = pixels;
    return DECODED;
}

static PyObject *decode_region(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *keywords[] = {"data", "x0", "y0", "x1", "y1", "scale_denom", NULL};
    Py_buffer buffer;
    int x0, y0, x1, y1, denom = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiii|i", keywords, &buffer, &x0, &y0, &x1, &y1, &denom))
        return NULL;
    if (x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0 || (denom != 1 && denom != 2 && denom != 4 && denom != 8)) {
        PyBuffer_Release(&buffer);
        PyErr_Format(PyExc_ValueError, "need 0 <= x0 < x1, 0 <= y0 < y1 and scale_denom in 1, 2, 4, 8; "
                     "got (%d, %d, %d, %d) at 1/%d", x0, y0, x1, y1, denom);
        return NULL;
    }
    region_job job = {buffer.buf, (unsigned long)buffer.len, x0, y0, x1, y1, denom, NULL, 0, 0, 0, 0};
    region_error err;
    enum outcome result;
    Py_BEGIN_ALLOW_THREADS
    result = decode(&job, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);

    switch (result) {
    case CORRUPT:
        PyErr_Format(PyExc_ValueError, "JPEG decode failed: %s", err.message);
        return NULL;
    case UNSUPPORTED:
        PyErr_SetString(PyExc_NotImplementedError, "JPEG colour space (CMYK/YCCK) has no RGB conversion in libjpeg");
        return NULL;
    case EMPTY:
        PyErr_Format(PyExc_ValueError, "region (%d, %d, %d, %d) lies outside the image at 1/%d", x0, y0, x1, y1, denom);
        return NULL;
    case NO_MEMORY:
        return PyErr_NoMemory();
    case DECODED:
        break;
    }
    PyObject *rgb = PyBytes_FromStringAndSize((const char *)job.pixels, (Py_ssize_t)job.width * job.height * 3);
    free(job.pixels);
    if (rgb == NULL)
        return NULL;
    return Py_BuildValue("(Niiii)", rgb, (int)job.width, (int)job.height, (int)job.left, (int)job.top);
}

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     "decode_region(data, x0, y0, x1, y1, scale_denom=1) -> (rgb, width, height, left, top)\n\n"
     "Decode only a rectangle of a JPEG (coordinates at 1/scale_denom); libjpeg widens it to whole\n"
     "iMCU columns, so the result starts at column `left` and row `top`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegregion",
                                    "Region (crop) decoding of JPEGs with libjpeg-turbo.", -1, methods};

PyMODINIT_FUNC PyInit__jpegregion(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL)
        PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION);
    return m;
}
