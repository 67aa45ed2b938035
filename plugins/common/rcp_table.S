/* Embeds rcp_sm90.bin (see fastmath.c) into the plugin. */
    .section .rodata
    .balign 64
    .globl qlp_rcp_sm90_table
    .hidden qlp_rcp_sm90_table
    .type qlp_rcp_sm90_table, @object
qlp_rcp_sm90_table:
    .incbin QLP_RCP_TABLE_PATH
    .size qlp_rcp_sm90_table, . - qlp_rcp_sm90_table
    .section .note.GNU-stack,"",@progbits
