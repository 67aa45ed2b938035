/* The bit-level facts of the bitsandbytes formats: tables, thresholds, nibble
 * order, odd lengths, zero blocks, the dynamic map, the double-quantization
 * offset, the fast-math emulation, bits per parameter and the quant_state JSON
 * number format.  Expected values marked "measured" were read off bitsandbytes
 * 0.50.2.dev0 / torch 2.11 on an H100 (see docs/bit-exactness.md). */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bnb.h"
#include "fastmath.h"
#include "torch_mean.h"

static uint32_t bits(float f) { return qlp_f2u(f); }

START_TEST(nf4_table_and_thresholds)
{
    float t[16];
    qlp_4bit_table(QLP_NF4, t);
    ck_assert_float_eq(t[0], -1.0f);
    ck_assert_float_eq(t[7], 0.0f);
    ck_assert_float_eq(t[8], 0.07958029955625534f);
    ck_assert_float_eq(t[15], 1.0f);
    for (int i = 1; i < 16; i++) ck_assert_msg(t[i] > t[i - 1], "NF4 table not increasing at %d", i);
    /* a threshold value itself goes to the lower code; the next float up to the upper */
    static const float thresholds[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,
                                         -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,
                                         -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,
                                         0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                                         0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
    for (unsigned i = 0; i < 15; i++) {
        ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, thresholds[i]), i);
        ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, nextafterf(thresholds[i], 2.0f)), i + 1);
    }
    ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, 0.0f), 7);
    ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, -0.0f), 7);
    ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, NAN), 0); /* 0 * inf of an all-zero block */
    ck_assert_uint_eq(qlp_4bit_encode(QLP_NF4, INFINITY), 15);
}
END_TEST

START_TEST(fp4_table_and_thresholds)
{
    float t[16];
    qlp_4bit_table(QLP_FP4, t);
    static const float expect[8] = {0.0f, 0.0625f / 12, 8.0f / 12, 1.0f, 4.0f / 12, 0.5f, 2.0f / 12, 0.25f};
    for (int i = 0; i < 8; i++) {
        ck_assert_uint_eq(bits(t[i]), bits(expect[i]));
        if (i) ck_assert_uint_eq(bits(t[8 + i]), bits(-expect[i]));
    }
    ck_assert_uint_eq(bits(t[8]), 0u); /* stored as +0 (measured), not -0 */
    ck_assert_uint_eq(bits(t[1]), 0x3baaaaabu);
    static const float th[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
    static const unsigned below[7] = {0, 1, 6, 7, 4, 5, 2}, above[7] = {1, 6, 7, 4, 5, 2, 3};
    for (int i = 0; i < 7; i++) {
        ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, th[i]), below[i]);
        ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, nextafterf(th[i], 2.0f)), above[i]);
        ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, -nextafterf(th[i], 2.0f)), above[i] + 8);
    }
    ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, -0.0f), 0);
    ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, -1.0f), 11);
    ck_assert_uint_eq(qlp_4bit_encode(QLP_FP4, NAN), 0);
}
END_TEST

START_TEST(nibble_order_and_odd_length)
{
    uint8_t packed[2];
    float absmax[1];
    const float x[3] = {1.0f, -1.0f, 0.5f};
    qlp_quantize_4bit_blocks(QLP_NF4, x, 3, 64, packed, absmax);
    ck_assert_float_eq(absmax[0], 1.0f);
    ck_assert_uint_eq(packed[0], 0xF0); /* element 0 high nibble, element 1 low */
    ck_assert_uint_eq(packed[1], 0xC7); /* 0.5 -> 12; the missing element encodes as 0.0 -> 7 (measured) */
    qlp_quantize_4bit_blocks(QLP_FP4, x, 3, 64, packed, absmax);
    ck_assert_uint_eq(packed[0], 0x3B);
    ck_assert_uint_eq(packed[1], 0x50); /* FP4 encodes 0.0 as 0 */
}
END_TEST

START_TEST(zero_and_extreme_blocks)
{
    float x[192];
    for (int i = 0; i < 64; i++) x[i] = 0.0f;                    /* all zero */
    for (int i = 64; i < 128; i++) x[i] = (i & 1) ? 3e38f : 1.0f; /* reciprocal flushes to zero */
    for (int i = 128; i < 192; i++) x[i] = 1e-39f;               /* subnormal: max flushes to zero */
    uint8_t packed[96];
    float absmax[3];
    qlp_quantize_4bit_blocks(QLP_NF4, x, 192, 64, packed, absmax);
    ck_assert_uint_eq(bits(absmax[0]), 0u);
    ck_assert_uint_eq(bits(absmax[1]), bits(3e38f));
    ck_assert_uint_eq(bits(absmax[2]), 0u);
    for (int i = 0; i < 32; i++) ck_assert_uint_eq(packed[i], 0x00);      /* NaN -> code 0 */
    for (int i = 32; i < 64; i++) ck_assert_uint_eq(packed[i], 0x77);     /* x * 0 = 0 -> code 7 (measured) */
    for (int i = 64; i < 96; i++) ck_assert_uint_eq(packed[i], 0x00);
}
END_TEST

/* create_dynamic_map(signed=True) as bitsandbytes 0.50.2.dev0 builds it on
 * torch 2.11 (measured, bit patterns). */
static const uint32_t measured_dynamic_map[256] = {
0xbf7e3333u, 0xbf7a999au, 0xbf770000u, 0xbf736666u, 0xbf6fcccdu, 0xbf6c3333u, 0xbf68999au, 0xbf650000u,
0xbf616666u, 0xbf5dcccdu, 0xbf5a3333u, 0xbf56999au, 0xbf530000u, 0xbf4f6666u, 0xbf4bcccdu, 0xbf483333u,
0xbf44999au, 0xbf410000u, 0xbf3d6666u, 0xbf39cccdu, 0xbf363334u, 0xbf32999au, 0xbf2f0000u, 0xbf2b6666u,
0xbf27cccdu, 0xbf243334u, 0xbf20999au, 0xbf1d0000u, 0xbf196666u, 0xbf15cccdu, 0xbf123334u, 0xbf0e999au,
0xbf0b0000u, 0xbf076666u, 0xbf03ccccu, 0xbf003333u, 0xbef93332u, 0xbef20000u, 0xbeeaccccu, 0xbee3999au,
0xbedc6666u, 0xbed53333u, 0xbece0000u, 0xbec6ccccu, 0xbebf999au, 0xbeb86666u, 0xbeb13333u, 0xbeaa0000u,
0xbea2ccccu, 0xbe9b999au, 0xbe946666u, 0xbe8d3334u, 0xbe860000u, 0xbe7d9999u, 0xbe6f3333u, 0xbe60cccdu,
0xbe526666u, 0xbe440000u, 0xbe35999au, 0xbe273333u, 0xbe18cccdu, 0xbe0a6666u, 0xbdf80000u, 0xbddb3334u,
0xbdc9eb85u, 0xbdc428f7u, 0xbdbe6667u, 0xbdb8a3d7u, 0xbdb2e148u, 0xbdad1eb8u, 0xbda75c2au, 0xbda1999au,
0xbd9bd70au, 0xbd96147bu, 0xbd9051ebu, 0xbd8a8f5du, 0xbd84cccdu, 0xbd7e147bu, 0xbd728f5du, 0xbd670a3du,
0xbd5b851fu, 0xbd500000u, 0xbd447ae1u, 0xbd38f5c3u, 0xbd2d70a3u, 0xbd21eb85u, 0xbd166667u, 0xbd0ae148u,
0xbcfeb852u, 0xbce7ae15u, 0xbcd0a3d7u, 0xbcb9999au, 0xbca28f5du, 0xbc8b851fu, 0xbc68f5c3u, 0xbc3ae148u,
0xbc1f3b64u, 0xbc160418u, 0xbc0ccccdu, 0xbc039581u, 0xbbf4bc6au, 0xbbe24dd3u, 0xbbcfdf3bu, 0xbbbd70a4u,
0xbbab020du, 0xbb989374u, 0xbb8624ddu, 0xbb676c8au, 0xbb428f5cu, 0xbb1db22du, 0xbaf1a9fcu, 0xbaa7ef9du,
0xba7765ffu, 0xba59e83eu, 0xba3c6a80u, 0xba1eecc1u, 0xba016f01u, 0xb9c7e283u, 0xb98ce705u, 0xb923d70bu,
0xb8ba1f4bu, 0xb88aefb3u, 0xb8378034u, 0xb7b24206u, 0xb70205ffu, 0xb65a1a94u, 0xb513a3b7u, 0x00000000u,
0x3513a3b7u, 0x365a1a94u, 0x370205ffu, 0x37b24206u, 0x38378034u, 0x388aefb3u, 0x38ba1f4bu, 0x3923d70bu,
0x398ce705u, 0x39c7e283u, 0x3a016f01u, 0x3a1eecc1u, 0x3a3c6a80u, 0x3a59e83eu, 0x3a7765ffu, 0x3aa7ef9du,
0x3af1a9fcu, 0x3b1db22du, 0x3b428f5cu, 0x3b676c8au, 0x3b8624ddu, 0x3b989374u, 0x3bab020du, 0x3bbd70a4u,
0x3bcfdf3bu, 0x3be24dd3u, 0x3bf4bc6au, 0x3c039581u, 0x3c0ccccdu, 0x3c160418u, 0x3c1f3b64u, 0x3c3ae148u,
0x3c68f5c3u, 0x3c8b851fu, 0x3ca28f5du, 0x3cb9999au, 0x3cd0a3d7u, 0x3ce7ae15u, 0x3cfeb852u, 0x3d0ae148u,
0x3d166667u, 0x3d21eb85u, 0x3d2d70a3u, 0x3d38f5c3u, 0x3d447ae1u, 0x3d500000u, 0x3d5b851fu, 0x3d670a3du,
0x3d728f5du, 0x3d7e147bu, 0x3d84cccdu, 0x3d8a8f5du, 0x3d9051ebu, 0x3d96147bu, 0x3d9bd70au, 0x3da1999au,
0x3da75c2au, 0x3dad1eb8u, 0x3db2e148u, 0x3db8a3d7u, 0x3dbe6667u, 0x3dc428f7u, 0x3dc9eb85u, 0x3ddb3334u,
0x3df80000u, 0x3e0a6666u, 0x3e18cccdu, 0x3e273333u, 0x3e35999au, 0x3e440000u, 0x3e526666u, 0x3e60cccdu,
0x3e6f3333u, 0x3e7d9999u, 0x3e860000u, 0x3e8d3334u, 0x3e946666u, 0x3e9b999au, 0x3ea2ccccu, 0x3eaa0000u,
0x3eb13333u, 0x3eb86666u, 0x3ebf999au, 0x3ec6ccccu, 0x3ece0000u, 0x3ed53333u, 0x3edc6666u, 0x3ee3999au,
0x3eeaccccu, 0x3ef20000u, 0x3ef93332u, 0x3f003333u, 0x3f03ccccu, 0x3f076666u, 0x3f0b0000u, 0x3f0e999au,
0x3f123334u, 0x3f15cccdu, 0x3f196666u, 0x3f1d0000u, 0x3f20999au, 0x3f243334u, 0x3f27cccdu, 0x3f2b6666u,
0x3f2f0000u, 0x3f32999au, 0x3f363334u, 0x3f39cccdu, 0x3f3d6666u, 0x3f410000u, 0x3f44999au, 0x3f483333u,
0x3f4bcccdu, 0x3f4f6666u, 0x3f530000u, 0x3f56999au, 0x3f5a3333u, 0x3f5dcccdu, 0x3f616666u, 0x3f650000u,
0x3f68999au, 0x3f6c3333u, 0x3f6fcccdu, 0x3f736666u, 0x3f770000u, 0x3f7a999au, 0x3f7e3333u, 0x3f800000u
};

START_TEST(dynamic_map_matches_reference)
{
    float map[256];
    qlp_dynamic_map_signed(map);
    for (int i = 0; i < 256; i++)
        ck_assert_msg(bits(map[i]) == measured_dynamic_map[i], "map[%d] = %a (0x%08x), expected 0x%08x", i, map[i],
                      bits(map[i]), measured_dynamic_map[i]);
    ck_assert_float_eq(map[0], -0.99296875f);
    ck_assert_float_eq(map[127], 0.0f);
    ck_assert_float_eq(map[255], 1.0f);
    ck_assert_float_eq_tol(map[128], 5.5e-7f, 1e-12f);
    /* nearest code by the reference's search */
    ck_assert_uint_eq(qlp_code8_encode(map, 0.0f), 127);
    ck_assert_uint_eq(qlp_code8_encode(map, 1.0f), 255);
    ck_assert_uint_eq(qlp_code8_encode(map, -1.0f), 0);
    ck_assert_uint_eq(qlp_code8_encode(map, NAN), 0);
    for (int i = 1; i < 255; i++) ck_assert_uint_eq(qlp_code8_encode(map, map[i]), (unsigned)i);
}
END_TEST

START_TEST(double_quant_offset_is_torch_cuda_mean)
{
    static const uint32_t in5[5] = {0x3df28c42u, 0x3f210504u, 0x3dc76dccu, 0x3e72f53du, 0x3d458d04u};
    static const uint32_t in33[33] = {
        0x3db24b27u, 0x3e0da779u, 0x3e61efcdu, 0x3ef231ffu, 0x3f4f4e16u, 0x3b6bbbbfu, 0x3d1a1ce6u, 0x3e9ec3efu,
        0x3f2a3cbdu, 0x3f35716bu, 0x3f38cd26u, 0x3e51d58fu, 0x3aa849a7u, 0x3e227f5au, 0x3c2adc2fu, 0x3a095da3u,
        0x3f3a8356u, 0x3f18e823u, 0x390c043au, 0x3e4c3202u, 0x3d9c5277u, 0x3d9e4514u, 0x3cd03256u, 0x3e9c1a7bu,
        0x3c507c5bu, 0x3e968bb6u, 0x3ec53173u, 0x3f0e4263u, 0x3e98cb46u, 0x392adb91u, 0x3c139f38u, 0x3ec2dcfdu,
        0x3e56d0dbu};
    float x[33];
    for (int i = 0; i < 5; i++) x[i] = qlp_u2f(in5[i]);
    ck_assert_uint_eq(bits(qlp_torch_cuda_mean_f32(x, 5)), 0x3e677b83u); /* measured */
    for (int i = 0; i < 33; i++) x[i] = qlp_u2f(in33[i]);
    ck_assert_uint_eq(bits(qlp_torch_cuda_mean_f32(x, 33)), 0x3e871549u); /* measured */
    ck_assert_float_eq(qlp_torch_cuda_mean_f32(x, 1), x[0]);
}
END_TEST

START_TEST(fast_math_reciprocal)
{
    /* rcp.approx.ftz.f32 on an H100 (measured), including results that are
     * not the correctly rounded reciprocal, and flushed ones */
    static const uint32_t cases[][2] = {
        {0x2b08438du, 0x53f0797fu}, {0x1316d7b7u, 0x6bd93ba6u}, {0x227f9eb4u, 0x5c8030b8u}, {0x469e1d82u, 0x384f3dc1u},
        {0x70678641u, 0x0e8d8811u}, {0x1736f8e1u, 0x67b3165cu}, {0x67624adcu, 0x1790cdc6u}, {0x5b4e26bbu, 0x239ef384u},
        {0x15957fd0u, 0x695b2f5eu}, {0x245afdc5u, 0x5a95a1abu}, {0x2b6c234bu, 0x538ac433u}, {0x3b922f63u, 0x43602778u},
        {0x00451efbu, 0x7f800000u}, {0x7e83d5f2u, 0x00000000u}, {0x7f388fcau, 0x00000000u}, {0x7f78bca0u, 0x00000000u},
        {0x3f800000u, 0x3f800000u}, {0x00000000u, 0x7f800000u},
    };
    int not_ieee = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float x = qlp_u2f(cases[i][0]);
        ck_assert_msg(bits(qlp_rcp_approx_ftz(x)) == cases[i][1], "rcp(0x%08x) = 0x%08x, expected 0x%08x", cases[i][0],
                      bits(qlp_rcp_approx_ftz(x)), cases[i][1]);
        not_ieee += i < 12 && bits(1.0f / x) != cases[i][1];
    }
    ck_assert_int_eq(not_ieee, 12);
    /* __fdividef(127, h) for float16 h (measured) */
    ck_assert_uint_eq(bits(qlp_fdividef(127.0f, 1.0f)), 0x42fe0000u);
    ck_assert_uint_eq(bits(qlp_fdividef(127.0f, 65504.0f)), 0x3afe1fc4u);
    ck_assert_uint_eq(bits(qlp_fdividef(127.0f, 5.960464477539063e-08f)), 0x4efe0000u);
}
END_TEST

START_TEST(python_float_repr)
{
    static const struct {
        double v;
        const char *s;
    } cases[] = {
        {0.1, "0.1"},           {2.0, "2.0"},         {1e-05, "1e-05"},     {1.5e-07, "1.5e-07"},
        {1e16, "1e+16"},        {123456789.0, "123456789.0"}, {-0.0, "-0.0"},  {0.0001, "0.0001"},
        {(double)0.32861328125f, "0.32861328125"}, {(double)0.1f, "0.10000000149011612"},
        {1.2345678901234568e+17, "1.2345678901234568e+17"}, {-2.5e-10, "-2.5e-10"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[64];
        qlp_format_pyfloat(cases[i].v, buf, sizeof buf);
        ck_assert_str_eq(buf, cases[i].s);
    }
}
END_TEST

START_TEST(blockwise8_nested_layout)
{
    float map[256];
    qlp_dynamic_map_signed(map);
    float x[300];
    for (int i = 0; i < 300; i++) x[i] = (float)(i % 17) - 8.0f;
    uint8_t codes[300];
    float absmax[2];
    qlp_quantize_8bit_blocks(map, x, 300, 256, codes, absmax);
    ck_assert_float_eq(absmax[0], 8.0f);
    ck_assert_float_eq(absmax[1], 8.0f);
    ck_assert_uint_eq(codes[8], 127);  /* 0 */
    ck_assert_uint_eq(codes[16], 255); /* 8/8 = 1 */
    ck_assert_uint_eq(codes[0], 0);    /* -1 -> the most negative code */
    for (int i = 0; i < 300; i++) {
        float back = map[codes[i]] * absmax[i / 256];
        ck_assert_msg(fabsf(back - x[i]) <= 0.02f * 8.0f, "element %d: %g back as %g", i, x[i], back);
    }
}
END_TEST

Suite *formats_suite(void)
{
    Suite *s = suite_create("formats");
    TCase *t = tcase_create("4bit");
    tcase_add_test(t, nf4_table_and_thresholds);
    tcase_add_test(t, fp4_table_and_thresholds);
    tcase_add_test(t, nibble_order_and_odd_length);
    tcase_add_test(t, zero_and_extreme_blocks);
    suite_add_tcase(s, t);
    t = tcase_create("double_quant");
    tcase_add_test(t, dynamic_map_matches_reference);
    tcase_add_test(t, double_quant_offset_is_torch_cuda_mean);
    tcase_add_test(t, blockwise8_nested_layout);
    suite_add_tcase(s, t);
    t = tcase_create("numerics");
    tcase_add_test(t, fast_math_reciprocal);
    tcase_add_test(t, python_float_repr);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *r = srunner_create(formats_suite());
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
